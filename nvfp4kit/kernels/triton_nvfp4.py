"""Triton kernels for the hot paths of the NVFP4 format core.

Every kernel here has a plain torch reference in :mod:`nvfp4kit.formats` (for the fused RHT,
:func:`nvfp4kit.formats.hadamard.rht_butterfly`) and is tested against it bit for bit under the Triton
interpreter (``TRITON_INTERPRET=1`` on CPU tensors). On CUDA the same source compiles to GPU code.

Which kernels the library calls, always through :mod:`nvfp4kit.kernels.dispatch`: :func:`quantize_parts`
(``backend="auto"`` on CUDA tensors), and in the NVFP4 training recipe's fused path
(``NVFP4FusedLinear`` of ``nvfp4kit.training.qlinear``, on CUDA) :func:`quantize_rowwise_columnwise`, :func:`rht_quantize`,
:func:`global_amax` and :func:`dequantize` (the exact bf16 block values its GEMMs multiply).
:func:`nvfp4_gemm` and :func:`mxfp8_quantize` are exact and tested, reached from benchmarks and tests only.

Kernels
-------
* :func:`quantize_parts` - fused NVFP4 quantize in one pass over the input: block amax, E4M3 block
  scale, scaled E2M1 codes, packed bytes. 1x16 and 16x16 blocks; nearest or stochastic rounding.
* :func:`quantize_rowwise_columnwise` - the rowwise parts of ``x`` and the rowwise parts of ``x^T``
  (blocks along the token dim, as wgrad needs) from one read of ``x`` in one launch; optionally with
  the 16-point RHT applied to the columnwise operand.
* :func:`rht_quantize` - RHT along the last dim fused with the 1x16 quantize (amax after the transform).
* :func:`global_amax` - the per-tensor amax as a two-phase reduction (per-program partials, then a max).
* :func:`dequantize` - parts back to float32/bfloat16/float16.
* :func:`nvfp4_gemm` - emulated NVFP4 GEMM: ``tl.dot`` on dequantized tiles with float32 accumulation
  (for GPUs without FP4 tensor cores; ``tl.dot_scaled`` is not used).
* :func:`mxfp8_quantize` - MXFP8 (E4M3 elements, one E8M0 scale per 32).

Numerics
--------
All arithmetic follows the canonical order of ``formats/nvfp4.py``. Nothing relies on the
floating-point casts whose behaviour differs between the interpreter and the hardware:

* E4M3 rounding (block scales, MXFP8 elements) is integer arithmetic on the float32 bits
  (round-to-nearest-even, saturating at 448; subnormals by an explicit RTNE shift). The
  interpreter's own fp8 cast rounds ties up and does not saturate, so it is never used.
* float32 -> bfloat16 outputs use an integer RTNE (the interpreter truncates).
* Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest), not the approximate ``/``.
* Products that feed an addition are exact (signs, powers of two), so FMA contraction on the GPU
  cannot change a result.

Stochastic rounding draws one Philox number per element, keyed by a seed taken from the caller's
``torch.Generator`` and counted by the element's coordinates: reproducible for a given generator
state and unbiased, but not the same draws as the torch reference (which uses ``torch.rand``).

Input policy matches the reference: float32/bfloat16/float16 are read natively, float64 is
converted to float32 on the host (values beyond float32 raise); NaN/inf raise ``ValueError`` (detected
inside the kernel, checked after it); last dim a multiple of 16; any strides (a 2D view is read in
place, other layouts are reshaped first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.hadamard import DEFAULT_RHT_SIGN, RHT_SIZE, rht_matrix
from ..formats import mx as ref_mx
from ..formats.mx import MX_BLOCK_SIZE, MXParts
from ..formats.nvfp4 import (
    BLOCK_1D,
    BLOCK_2D,
    BLOCK_SIZE,
    NVFP4Parts,
    _as_amax,
    check_quantizable,
)
from ..formats.nvfp4 import quantize_parts as reference_quantize_parts
from ..formats.scales import FP32_MAX, NVFP4_RANGE

__all__ = [
    "available",
    "quantize_parts",
    "quantize_rowwise_columnwise",
    "rht_quantize",
    "global_amax",
    "dequantize",
    "nvfp4_gemm",
    "mxfp8_quantize",
]

# float32(1/6) and float32(1/448), exactly as the reference computes them (1.0 / 6.0 in float32)
_INV6 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(6.0, dtype=torch.float32))
_INV448 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32))
_FLT_MAX = float(FP32_MAX)
INV6 = tl.constexpr(_INV6)
INV448 = tl.constexpr(_INV448)
FLT_MAX = tl.constexpr(_FLT_MAX)
TWO_POW_64 = tl.constexpr(2.0**64)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ============================================================================ device functions


@triton.jit
def _e4m3_code_nonneg(y):
    """RTNE float32 -> E4M3 magnitude byte (int32, 0..126) for finite 0 <= y <= 448."""
    bits = y.to(tl.int32, bitcast=True)
    exp = bits >> 23
    # normal E4M3 (y >= 2^-6): keep 3 mantissa bits, ties to even; a carry bumps the exponent
    rn = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = rn - 960  # re-bias: (exp - 127 + 7) << 3 | mantissa
    # subnormal E4M3: round y / 2^-9 to an integer, ties to even (0..8; 8 is the smallest normal)
    mant = tl.where(exp > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    shift = tl.minimum(tl.maximum(141 - tl.maximum(exp, 1), 1), 30)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = q + up.to(tl.int32)
    return tl.where(exp >= 121, normal, sub)


@triton.jit
def _e4m3_value(code):
    """E4M3 byte (int32; sign bit 0x80 honoured, 0x7F/0xFF are NaN) -> float32, exact."""
    mag = code & 0x7F
    e = mag >> 3
    m = mag & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e > 0, normal, m.to(tl.float32) * 0.001953125)
    val = tl.where((code & 0x80) != 0, -val, val)
    return tl.where(mag == 0x7F, float("nan"), val)


@triton.jit
def _e2m1_value(mag):
    """E2M1 magnitude code (int32 0..7) -> float32 (0, .5, 1, 1.5, 2, 3, 4, 6)."""
    v = tl.where(mag == 7, 6.0, tl.where(mag == 6, 4.0, tl.where(mag == 5, 3.0, 2.0)))
    return tl.where(mag < 4, mag.to(tl.float32) * 0.5, v)


@triton.jit
def _bf16_bits_rtne(v):
    """float32 -> bfloat16 bit pattern (int16), round-to-nearest-even (finite and inf inputs)."""
    bits = v.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.to(tl.int16)


@triton.jit
def _global_scales(amax, RANGE: tl.constexpr):
    """S_enc = min(RANGE / amax, FLT_MAX) (1 if amax is 0 or S_enc underflows); S_dec = 1 / S_enc."""
    one = tl.full(amax.shape, 1.0, tl.float32)
    zero = amax == 0.0
    s_enc = tl.minimum(tl.math.div_rn(one * RANGE, tl.where(zero, one, amax)), FLT_MAX)
    s_enc = tl.where(zero | (s_enc == 0.0), one, s_enc)
    s_dec = tl.math.div_rn(one, s_enc)
    return s_enc, s_dec


@triton.jit
def _rht16(x, R: tl.constexpr, C: tl.constexpr, SIGN_MASK: tl.constexpr):
    """Blockwise RHT of a [R, C] float32 tile along its last dim: each 16-group becomes
    ((x * sign) @ Hadamard16) * 0.25, the Hadamard product as a radix-2 butterfly over index bits
    0, 1, 2, 3 in that order (the order :func:`~nvfp4kit.formats.hadamard.rht_butterfly` uses)."""
    N: tl.constexpr = R * (C // 16)
    idx = tl.arange(0, 16)
    # the sign is applied by flipping the sign bit (no multiply that could be contracted into an FMA)
    flip = tl.where(((SIGN_MASK >> idx) & 1) != 0, -2147483648, 0).to(tl.int32)
    y = (tl.reshape(x, (N, 16)).to(tl.int32, bitcast=True) ^ flip[None, :]).to(tl.float32, bitcast=True)
    for _ in tl.static_range(4):
        a, b = tl.split(tl.reshape(y, (N, 8, 2)))
        # the new bit goes first, so after four stages the index order is restored
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (N, 16))
    return tl.reshape(y * 0.25, (R, C))


@triton.jit
def _nonfinite_count(x):
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)


@triton.jit
def _quantize_tile(x, s_enc, s_dec, seed, row0, col0, R: tl.constexpr, C: tl.constexpr,
                   TWO_D: tl.constexpr, STOCHASTIC: tl.constexpr):
    """NVFP4-quantize the rows of a float32 [R, C] tile in blocks of 16 along C (TWO_D: 16x16 tiles,
    R a multiple of 16 and the tile aligned to 16 rows). Returns (packed uint8 [R, C/2],
    block-scale bytes uint8 [R, C/16])."""
    NB: tl.constexpr = C // 16
    ax = tl.abs(x)
    ax3 = tl.reshape(ax, (R, NB, 16))
    bamax = tl.max(ax3, axis=2)  # [R, NB]
    if TWO_D:
        tile_max = tl.max(tl.reshape(bamax, (R // 16, 16, NB)), axis=1)  # [R/16, NB]
        bamax = tl.reshape(tl.broadcast_to(tile_max[:, None, :], (R // 16, 16, NB)), (R, NB))
    factor = s_enc * INV6  # float32(S_enc * float32(1/6))
    y = tl.minimum(bamax * factor, 448.0)  # min(., FLT_MAX) then the clamp to 448 in one step
    scale_code = _e4m3_code_nonneg(y)
    s_b = _e4m3_value(scale_code)
    one = tl.full(s_b.shape, 1.0, tl.float32)
    denom = s_b * s_dec
    # min(1 / denom, FLT_MAX); a zero denominator (underflowed scale) gives FLT_MAX
    enc = tl.where(denom == 0.0, FLT_MAX, tl.minimum(tl.math.div_rn(one, tl.where(denom == 0.0, one, denom)), FLT_MAX))
    a = ax3 * enc[:, :, None]  # |x * enc_b|
    if STOCHASTIC:
        a = tl.minimum(a, 6.0)
        low = ((a >= 0.5).to(tl.int32) + (a >= 1.0).to(tl.int32) + (a >= 1.5).to(tl.int32)
               + (a >= 2.0).to(tl.int32) + (a >= 3.0).to(tl.int32) + (a >= 4.0).to(tl.int32)
               + (a >= 6.0).to(tl.int32))
        high = tl.minimum(low + 1, 7)
        inv_gap = tl.where(low < 4, 2.0, tl.where(low < 6, 1.0, 0.5))
        frac = (a - _e2m1_value(low)) * inv_gap  # exact: Sterbenz, power-of-two gap
        rows = (row0 + tl.arange(0, R)).to(tl.uint32)
        cols = (col0 + tl.arange(0, C)).to(tl.uint32)
        c0 = tl.reshape(tl.broadcast_to(cols[None, :], (R, C)), (R, NB, 16))
        c1 = tl.reshape(tl.broadcast_to(rows[:, None], (R, C)), (R, NB, 16))
        zero = tl.zeros((R, NB, 16), tl.uint32)
        r0, _r1, _r2, _r3 = tl.random.philox(seed, c0, c1, zero, zero)
        u = (r0 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 24 random bits -> [0, 1)
        mag = tl.where(u < frac, high, low)
    else:
        mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
               + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
               + (a > 5.0).to(tl.int32))
    sign = (tl.reshape(x, (R, NB, 16)).to(tl.int32, bitcast=True) >> 28) & 0x8
    codes = tl.reshape(mag | sign, (R, C // 2, 2))
    lo, hi = tl.split(codes)
    packed = (lo | (hi << 4)).to(tl.uint8)
    return packed, scale_code.to(tl.uint8)


@triton.jit
def _store_parts(packed, scale, packed_ptr, scale_ptr, row0, col0, n_rows, n_cols,
                 R: tl.constexpr, C: tl.constexpr):
    """Store a tile's packed bytes and scale bytes into row-major [n_rows, n_cols/2] / [n_rows, n_cols/16]."""
    rows = row0 + tl.arange(0, R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    pc = col0 // 2 + tl.arange(0, C // 2)
    tl.store(packed_ptr + rows64[:, None] * (n_cols // 2) + pc[None, :], packed,
             mask=rmask[:, None] & (pc[None, :] < n_cols // 2))
    sc = col0 // 16 + tl.arange(0, C // 16)
    tl.store(scale_ptr + rows64[:, None] * (n_cols // 16) + sc[None, :], scale,
             mask=rmask[:, None] & (sc[None, :] < n_cols // 16))


# ============================================================================ kernels


@triton.jit
def _amax_kernel(x_ptr, M, K, stride_b, stride_m, stride_k, partial_ptr, bad_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 ROW_RHT: tl.constexpr, COL_AMAX: tl.constexpr, COL_RHT: tl.constexpr, SIGN_MASK: tl.constexpr):
    """Phase one of the global amax: per-program max |x| (or |RHT_K(x)|) and, if COL_AMAX,
    max |RHT_M(x)^T| (or |x|); plus a count of non-finite values."""
    # axis 0 runs over batch x row tiles (no 65535 limit there), axis 1 over column tiles
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_b = tl.program_id(0) // tiles_m
    pid_m = tl.program_id(0) % tiles_m
    pid_k = tl.program_id(1)
    pid = pid_k * tl.num_programs(0) + tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    ptrs = (x_ptr + pid_b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_m
            + cols[None, :].to(tl.int64) * stride_k)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(bad_ptr + pid, _nonfinite_count(x))
    if ROW_RHT:
        xr = _rht16(x, BLOCK_M, BLOCK_K, SIGN_MASK)
    else:
        xr = x
    tl.store(partial_ptr + 2 * pid, tl.max(tl.max(tl.abs(xr), axis=1), axis=0))
    if COL_AMAX:
        if COL_RHT:
            xc = _rht16(tl.trans(x), BLOCK_K, BLOCK_M, SIGN_MASK)
        else:
            xc = tl.trans(x)
        tl.store(partial_ptr + 2 * pid + 1, tl.max(tl.max(tl.abs(xc), axis=1), axis=0))


@triton.jit
def _quantize_kernel(x_ptr, M, K, stride_b, stride_m, stride_k,
                     row_amax_ptr, row_packed_ptr, row_scale_ptr, row_sdec_ptr,
                     col_amax_ptr, col_packed_ptr, col_scale_ptr, col_sdec_ptr,
                     seed_ptr, bad_ptr,
                     RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     ROW: tl.constexpr, COL: tl.constexpr, TWO_D: tl.constexpr, STOCHASTIC: tl.constexpr,
                     ROW_RHT: tl.constexpr, COL_RHT: tl.constexpr, SIGN_MASK: tl.constexpr):
    """One read of a [M, K] tile (batch b of [B, M, K]); writes the rowwise parts of x (blocks along K)
    and/or the rowwise parts of x^T (blocks along M) into [K, M/2] / [K, M/16]."""
    # axis 0 runs over batch x row tiles (no 65535 limit there), axis 1 over column tiles
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_b = tl.program_id(0) // tiles_m
    pid_m = tl.program_id(0) % tiles_m
    pid_k = tl.program_id(1)
    pid = pid_k * tl.num_programs(0) + tl.program_id(0)
    row0 = pid_m * BLOCK_M
    col0 = pid_k * BLOCK_K
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    ptrs = (x_ptr + pid_b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_m
            + cols[None, :].to(tl.int64) * stride_k)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(bad_ptr + pid, _nonfinite_count(x))
    if ROW:
        s_enc, s_dec = _global_scales(tl.load(row_amax_ptr), RANGE)
        if pid == 0:
            tl.store(row_sdec_ptr, s_dec)
        if ROW_RHT:
            xr = _rht16(x, BLOCK_M, BLOCK_K, SIGN_MASK)
        else:
            xr = x
        seed = tl.load(seed_ptr)
        packed, scale = _quantize_tile(xr, s_enc, s_dec, seed, pid_b * M + row0, col0,
                                       BLOCK_M, BLOCK_K, TWO_D, STOCHASTIC)
        _store_parts(packed, scale, row_packed_ptr + pid_b.to(tl.int64) * M * (K // 2),
                     row_scale_ptr + pid_b.to(tl.int64) * M * (K // 16), row0, col0, M, K, BLOCK_M, BLOCK_K)
    if COL:
        c_enc, c_dec = _global_scales(tl.load(col_amax_ptr), RANGE)
        if pid == 0:
            tl.store(col_sdec_ptr, c_dec)
        xt = tl.trans(x)  # [BLOCK_K, BLOCK_M]: rows of x^T
        if COL_RHT:
            xt = _rht16(xt, BLOCK_K, BLOCK_M, SIGN_MASK)
        seed_c = tl.load(seed_ptr + 1)
        packed_t, scale_t = _quantize_tile(xt, c_enc, c_dec, seed_c, col0, row0,
                                           BLOCK_K, BLOCK_M, False, STOCHASTIC)
        _store_parts(packed_t, scale_t, col_packed_ptr, col_scale_ptr, col0, row0, K, M, BLOCK_K, BLOCK_M)


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, sdec_ptr, out_ptr, R, K,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, OUT_KIND: tl.constexpr):
    """x_hat = e2m1_value * (fp32(block_scale) * S_dec); OUT_KIND 0 float32, 1 bfloat16 bits, 2 float16."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    pc = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + pc[None, :],
                   mask=rmask[:, None] & (pc[None, :] < K // 2), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_R, BLOCK_K // 16, 16))
    val = _e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -val, val)
    sc = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    sbyte = tl.load(scale_ptr + rows[:, None] * (K // 16) + sc[None, :],
                    mask=rmask[:, None] & (sc[None, :] < K // 16), other=0).to(tl.int32)
    scale = _e4m3_value(sbyte) * tl.load(sdec_ptr)
    out = tl.reshape(val * scale[:, :, None], (BLOCK_R, BLOCK_K))
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    optrs = out_ptr + rows[:, None] * K + cols[None, :]
    omask = rmask[:, None] & (cols[None, :] < K)
    if OUT_KIND == 1:
        tl.store(optrs, _bf16_bits_rtne(out), mask=omask)
    elif OUT_KIND == 2:
        tl.store(optrs, out.to(tl.float16), mask=omask)
    else:
        tl.store(optrs, out, mask=omask)


@triton.jit
def _block_values_tile(packed_ptr, scale_ptr, rows, k0, n_rows, K, BR: tl.constexpr, BK: tl.constexpr):
    """E2M1 value * fp32 block scale of a [BR, BK] float32 tile. Each value has <= 6 significant bits,
    so the tensor cores' tf32 input format holds it exactly and every product in ``tl.dot`` is exact."""
    rmask = rows < n_rows
    pc = k0 // 2 + tl.arange(0, BK // 2)
    byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + pc[None, :],
                   mask=rmask[:, None] & (pc[None, :] < K // 2), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BR, BK // 16, 16))
    val = _e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -val, val)
    sc = k0 // 16 + tl.arange(0, BK // 16)
    sbyte = tl.load(scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + sc[None, :],
                    mask=rmask[:, None] & (sc[None, :] < K // 16), other=0).to(tl.int32)
    return tl.reshape(val * _e4m3_value(sbyte)[:, :, None], (BR, BK))


@triton.jit
def _gemm_kernel(a_packed, a_scale, b_packed, b_scale, alpha_ptr, out_ptr, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_KIND: tl.constexpr):
    """out[M, N] = (A_vals @ B_vals^T) * alpha with float32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _block_values_tile(a_packed, a_scale, rm, k0, M, K, BLOCK_M, BLOCK_K)
        b = _block_values_tile(b_packed, b_scale, rn, k0, N, K, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
    out = acc * tl.load(alpha_ptr)
    optrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if OUT_KIND == 1:
        tl.store(optrs, _bf16_bits_rtne(out), mask=omask)
    elif OUT_KIND == 2:
        tl.store(optrs, out.to(tl.float16), mask=omask)
    else:
        tl.store(optrs, out, mask=omask)


@triton.jit
def _floor_log2_pos(v):
    """Exact floor(log2(v)) of positive finite float32 v (int32), and whether v is a power of two."""
    bits = v.to(tl.int32, bitcast=True)
    sub = (bits >> 23) == 0
    vs = tl.where(sub, v * TWO_POW_64, v)  # * 2^64 is exact for subnormals
    sbits = vs.to(tl.int32, bitcast=True)
    e = ((sbits >> 23) & 0xFF) - 127 - tl.where(sub, 64, 0)
    return e, (sbits & 0x7FFFFF) == 0


@triton.jit
def _mxfp8_kernel(x_ptr, R, K, stride_r, stride_k, data_ptr, scale_ptr, bad_ptr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, RCEIL: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid = pid_k * tl.num_programs(0) + pid_r
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :].to(tl.int64) * stride_k,
                mask=mask, other=0.0).to(tl.float32)
    tl.store(bad_ptr + pid, _nonfinite_count(x))
    NB: tl.constexpr = BLOCK_K // 32
    x3 = tl.reshape(x, (BLOCK_R, NB, 32))
    amax = tl.max(tl.abs(x3), axis=2)
    positive = amax > 0.0
    if RCEIL:
        ratio = amax * INV448  # float32(1/448), as the reference
        safe = tl.where(ratio > 0.0, ratio, 1.0)
        fl, pow2 = _floor_log2_pos(safe)
        exp = tl.where(pow2, fl, fl + 1)
        exp = tl.where(ratio > 0.0, exp, -127)
    else:
        fl, _p = _floor_log2_pos(tl.where(positive, amax, 1.0))
        exp = fl - 8
    exp = tl.where(positive, exp, -127)
    exp = tl.minimum(tl.maximum(exp, -127), 127)
    ninv = -exp
    inv = tl.where(ninv >= -126, ((ninv + 127) << 23).to(tl.float32, bitcast=True),
                   tl.full(ninv.shape, 0x400000, tl.int32).to(tl.float32, bitcast=True))
    scaled = x3 * inv[:, :, None]
    code = _e4m3_code_nonneg(tl.minimum(tl.abs(scaled), 448.0))
    code = code | ((scaled.to(tl.int32, bitcast=True) >> 24) & 0x80)
    tl.store(data_ptr + rows[:, None] * K + cols[None, :], tl.reshape(code, (BLOCK_R, BLOCK_K)).to(tl.uint8),
             mask=mask)
    sc = pid_k * NB + tl.arange(0, NB)
    tl.store(scale_ptr + rows[:, None] * (K // 32) + sc[None, :], (exp + 127).to(tl.uint8),
             mask=(rows[:, None] < R) & (sc[None, :] < K // 32))


# ============================================================================ host side


def _interpreted() -> bool:
    """Whether the kernels were built for the interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return type(_quantize_kernel).__name__ == "InterpretedFunction"


def available(device) -> tuple[bool, str]:
    """Whether these kernels can run on tensors of ``device``, and why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreted():
            return True, ""
        if not torch.cuda.is_available():
            return False, "triton backend: CUDA is not available in this torch build or machine"
        return True, ""
    if device.type == "cpu":
        if _interpreted():
            return True, ""
        return False, (
            "triton backend: CPU tensors run only under the Triton interpreter; set TRITON_INTERPRET=1 "
            "before triton is first imported (or use backend='torch')"
        )
    return False, f"triton backend: unsupported device type {device.type!r} (CUDA, or CPU with TRITON_INTERPRET=1)"


def _require(x: torch.Tensor, name: str) -> None:
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"{name}: {why}")


def _tiles(kind: str) -> tuple[int, int]:
    # The interpreter runs each program's tile as numpy arrays: few, large tiles are fastest there.
    if _interpreted():
        return {"quant": (64, 128), "amax": (64, 256), "deq": (64, 256), "mx": (64, 256)}[kind]
    return {"quant": (32, 128), "amax": (64, 128), "deq": (32, 256), "mx": (32, 128)}[kind]


def _sign_mask(sign) -> int:
    """The RHT sign vector as a 16-bit mask (bit i set where sign[i] == -1), validated by rht_matrix."""
    s = DEFAULT_RHT_SIGN if sign is None else sign
    rht_matrix(s)  # raises a clear error for a bad vector
    vals = torch.as_tensor(s).flatten().tolist()
    return sum(1 << i for i, v in enumerate(vals) if v < 0)


def _prepare(x: torch.Tensor, name: str, block) -> torch.Tensor:
    """Reference input checks (same messages); a valid float64 tensor is converted to float32 here."""
    block = tuple(block)
    if (not isinstance(x, torch.Tensor) or x.dtype not in _SUPPORTED_DTYPES or x.ndim == 0
            or block not in (BLOCK_1D, BLOCK_2D) or x.shape[-1] % BLOCK_SIZE
            or (block == BLOCK_2D and x.ndim < 2)):
        check_quantizable(x, name, block)  # raises for everything but a valid float64 tensor
        return x.float()
    return x


def _amax_arg(global_amax, device, nonfinite) -> torch.Tensor:
    """The caller's global amax: validated (a host sync) unless the check is deferred (``nonfinite`` given),
    where a device tensor is used as it is."""
    if nonfinite is None:
        return _as_amax(global_amax, device)
    return torch.as_tensor(global_amax, dtype=torch.float32, device=device).reshape(())


def _check_nonfinite(bad: torch.Tensor, x: torch.Tensor, name: str, nonfinite) -> None:
    """Raise for NaN/inf now, or (``nonfinite``: an int32 device tensor) add the count there without a host
    sync, for the caller to check once later (the training recipe checks once per step)."""
    if nonfinite is None:
        _raise_if_nonfinite(bad, x, name)
    else:
        nonfinite.add_(bad.sum().to(nonfinite.dtype))


def _raise_if_nonfinite(bad: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if bool(bad.any()):
        check_quantizable(x, name)  # raises the reference's NaN/inf message
        raise ValueError(f"{name}: contains NaN or inf values")


def _seeds(rounding: str, generator, device) -> torch.Tensor:
    if rounding == "nearest":
        return torch.zeros(2, dtype=torch.int64, device=device)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    gen_device = generator.device if generator is not None else device
    seeds = torch.randint(0, 2**62, (2,), generator=generator, device=gen_device, dtype=torch.int64)
    return seeds.to(device)


def _view_3d(x: torch.Tensor, two_d: bool) -> torch.Tensor:
    if two_d:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    return x.reshape(1, -1, x.shape[-1])


def _run_amax(x3: torch.Tensor, *, row_rht=False, col=False, col_rht=False, sign_mask=0, tile=None):
    """Two-phase amax of a [B, M, K] view: (row amax, col amax or None, nonfinite flags)."""
    B, M, K = x3.shape
    bm, bk = tile or _tiles("amax")
    grid = (triton.cdiv(M, bm) * B, triton.cdiv(K, bk))
    n = grid[0] * grid[1]
    partial = torch.zeros(n, 2, dtype=torch.float32, device=x3.device)
    bad = torch.zeros(n, dtype=torch.int32, device=x3.device)
    _amax_kernel[grid](x3, M, K, x3.stride(0), x3.stride(1), x3.stride(2), partial, bad,
                       BLOCK_M=bm, BLOCK_K=bk, ROW_RHT=row_rht, COL_AMAX=col, COL_RHT=col_rht,
                       SIGN_MASK=sign_mask)
    amax = partial.amax(0)
    return amax[0], (amax[1] if col else None), bad


def _launch_quantize(x3, *, row, col, two_d, stochastic, row_amax, col_amax, seeds, rng_range,
                     row_rht=False, col_rht=False, sign_mask=0, tile=None):
    """Allocate outputs and run the fused kernel; returns (row parts tuple|None, col tuple|None, bad)."""
    B, M, K = x3.shape
    dev = x3.device
    bm, bk = tile or _tiles("quant")
    grid = (triton.cdiv(M, bm) * B, triton.cdiv(K, bk))
    n = grid[0] * grid[1]
    bad = torch.zeros(n, dtype=torch.int32, device=dev)
    dummy_u8 = torch.empty(1, dtype=torch.uint8, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    if row:
        r_packed = torch.empty(B, M, K // 2, dtype=torch.uint8, device=dev)
        r_scale = torch.empty(B, M, K // BLOCK_SIZE, dtype=torch.uint8, device=dev)
        r_sdec = torch.empty((), dtype=torch.float32, device=dev)
        r_amax = row_amax.reshape(1).float()
    else:
        r_packed = r_scale = dummy_u8
        r_sdec = r_amax = dummy_f
    if col:
        c_packed = torch.empty(K, B * M // 2, dtype=torch.uint8, device=dev)
        c_scale = torch.empty(K, B * M // BLOCK_SIZE, dtype=torch.uint8, device=dev)
        c_sdec = torch.empty((), dtype=torch.float32, device=dev)
        c_amax = col_amax.reshape(1).float()
    else:
        c_packed = c_scale = dummy_u8
        c_sdec = c_amax = dummy_f
    _quantize_kernel[grid](
        x3, M, K, x3.stride(0), x3.stride(1), x3.stride(2),
        r_amax, r_packed, r_scale, r_sdec, c_amax, c_packed, c_scale, c_sdec, seeds, bad,
        RANGE=rng_range, BLOCK_M=bm, BLOCK_K=bk, ROW=row, COL=col, TWO_D=two_d, STOCHASTIC=stochastic,
        ROW_RHT=row_rht, COL_RHT=col_rht, SIGN_MASK=sign_mask,
    )
    r = (r_packed, r_scale.view(torch.float8_e4m3fn), r_sdec) if row else None
    c = (c_packed, c_scale.view(torch.float8_e4m3fn), c_sdec) if col else None
    return r, c, bad


def _check_tile(tile, two_d=False):
    if tile is None:
        return
    bm, bk = tile
    for v in (bm, bk):
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16, got {tile}")


@torch.no_grad()
def quantize_parts(x: torch.Tensor, *, block=BLOCK_1D, rounding="nearest", generator=None, global_amax=None,
                   scale_rule="max", name: str = "input", tile=None, nonfinite=None) -> NVFP4Parts:
    """Fused NVFP4 quantize; same semantics and input checks as ``formats.nvfp4.quantize_parts``.
    ``nonfinite`` (an int32 device tensor): defer the NaN/inf check there (no host sync; see ``_check_nonfinite``).

    Bit-identical to the reference for ``rounding="nearest"``. ``"stochastic"`` draws from a Philox
    stream seeded by ``generator`` (reproducible per generator state, unbiased). ``scale_rule="4over6"``
    runs the torch reference (it needs two candidate quantizations per block).
    """
    block = tuple(block)
    if scale_rule == "4over6":
        return reference_quantize_parts(x, block, rounding, generator, global_amax, scale_rule, name)
    if scale_rule != "max":
        raise ValueError(f"scale_rule must be 'max' or '4over6', got {scale_rule!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    x = _prepare(x, name, block)
    _require(x, name)
    _check_tile(tile)
    if x.numel() == 0:
        return reference_quantize_parts(x, block, rounding, generator, global_amax, scale_rule, name)
    two_d = block == BLOCK_2D
    x3 = _view_3d(x, two_d)
    if global_amax is not None:
        amax = _amax_arg(global_amax, x.device, nonfinite)
        bad_amax = None
    else:
        amax, _, bad_amax = _run_amax(x3)
    seeds = _seeds(rounding, generator, x.device)
    r, _, bad = _launch_quantize(x3, row=True, col=False, two_d=two_d, stochastic=rounding == "stochastic",
                                 row_amax=amax, col_amax=None, seeds=seeds, rng_range=NVFP4_RANGE, tile=tile)
    _check_nonfinite(bad, x, name, nonfinite)
    packed, scale, sdec = r
    return NVFP4Parts(packed.reshape(*x.shape[:-1], -1), scale.reshape(*x.shape[:-1], -1), sdec, block)


@torch.no_grad()
def quantize_rowwise_columnwise(x: torch.Tensor, *, rounding="nearest", generator=None, global_amax=None,
                                columnwise_rht: bool = False, rht_sign=None, columnwise_global_amax=None,
                                name: str = "input", tile=None, nonfinite=None) -> tuple[NVFP4Parts, NVFP4Parts]:
    """1x16 parts of ``x`` (rows = all leading dims flattened, ``[T, K]``) and of ``x^T`` (``[K, T]``,
    blocks along T) from one read of ``x`` in one launch.

    Bit-identical (nearest) to ``reference(x2)`` and ``reference(x2.T)`` where ``x2 = x.reshape(-1, K)``;
    with ``columnwise_rht=True`` the columnwise operand is ``rht_butterfly(x2.T)`` (amax after the transform,
    kept in float32), as the wgrad GEMM needs. ``T`` must be a multiple of 16.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    x = _prepare(x, name, BLOCK_1D)
    _require(x, name)
    _check_tile(tile)
    x2 = x.reshape(-1, x.shape[-1])
    T, K = x2.shape
    if T % BLOCK_SIZE:
        raise ValueError(
            f"{name}: the columnwise (transposed) operand blocks run along the {T} rows of shape "
            f"{tuple(x.shape)}; that count must be a multiple of {BLOCK_SIZE} (pad the tokens)"
        )
    sign_mask = _sign_mask(rht_sign) if columnwise_rht else 0
    if T == 0 or K == 0:
        rw = reference_quantize_parts(x2, BLOCK_1D, rounding, generator, global_amax, "max", name)
        cw = reference_quantize_parts(x2.t(), BLOCK_1D, rounding, generator, columnwise_global_amax, "max", name)
        return rw, cw
    x3 = x2.unsqueeze(0)
    need_row = global_amax is None
    need_col = columnwise_rht and columnwise_global_amax is None
    if need_row or need_col:
        r_amax, c_amax, _ = _run_amax(x3, col=need_col, col_rht=columnwise_rht, sign_mask=sign_mask)
    row_amax = _amax_arg(global_amax, x.device, nonfinite) if global_amax is not None else r_amax
    if columnwise_rht:
        col_amax = (_amax_arg(columnwise_global_amax, x.device, nonfinite) if columnwise_global_amax is not None
                    else c_amax)
    else:
        col_amax = row_amax
    seeds = _seeds(rounding, generator, x.device)
    r, c, bad = _launch_quantize(x3, row=True, col=True, two_d=False, stochastic=rounding == "stochastic",
                                 row_amax=row_amax, col_amax=col_amax, seeds=seeds, rng_range=NVFP4_RANGE,
                                 col_rht=columnwise_rht, sign_mask=sign_mask, tile=tile)
    _check_nonfinite(bad, x, name, nonfinite)
    rw = NVFP4Parts(r[0].reshape(*x.shape[:-1], -1), r[1].reshape(*x.shape[:-1], -1), r[2], BLOCK_1D)
    cw = NVFP4Parts(c[0], c[1], c[2], BLOCK_1D)
    return rw, cw


@torch.no_grad()
def rht_quantize(x: torch.Tensor, *, rounding="nearest", generator=None, global_amax=None, rht_sign=None,
                 name: str = "input", tile=None, nonfinite=None) -> NVFP4Parts:
    """Fused RHT (16-point, along the last dim, sign vector applied in registers) + 1x16 quantize, amax
    taken after the transform. Bit-identical (nearest) to ``reference(rht_butterfly(x))``. For a wgrad
    operand pass the transposed view (``dy.t()``): strides are read in place, no copy.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    x = _prepare(x, name, BLOCK_1D)
    _require(x, name)
    _check_tile(tile)
    sign_mask = _sign_mask(rht_sign)
    if x.numel() == 0:
        return reference_quantize_parts(x, BLOCK_1D, rounding, generator, global_amax, "max", name)
    x3 = _view_3d(x, False)
    if global_amax is not None:
        amax = _amax_arg(global_amax, x.device, nonfinite)
    else:
        amax, _, _ = _run_amax(x3, row_rht=True, sign_mask=sign_mask)
    seeds = _seeds(rounding, generator, x.device)
    r, _, bad = _launch_quantize(x3, row=True, col=False, two_d=False, stochastic=rounding == "stochastic",
                                 row_amax=amax, col_amax=None, seeds=seeds, rng_range=NVFP4_RANGE,
                                 row_rht=True, sign_mask=sign_mask, tile=tile)
    _check_nonfinite(bad, x, name, nonfinite)
    return NVFP4Parts(r[0].reshape(*x.shape[:-1], -1), r[1].reshape(*x.shape[:-1], -1), r[2], BLOCK_1D)


@torch.no_grad()
def global_amax(x: torch.Tensor, *, rht: bool = False, rht_sign=None, name: str = "input",
                nonfinite=None) -> torch.Tensor:
    """max |x| (float32 0-dim) as a two-phase reduction; with ``rht=True`` max |rht_butterfly(x)|.
    NaN/inf raise ``ValueError`` (or, with ``nonfinite``, are counted there without a host sync).
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim == 0:
        x = x.reshape(1)
    if x.dtype == torch.float64:
        x = x.float()
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: global_amax reads float32/bfloat16/float16/float64, got {x.dtype}")
    if rht and x.shape[-1] % RHT_SIZE:
        raise ValueError(f"{name}: rht needs a last dim multiple of {RHT_SIZE}, got shape {tuple(x.shape)}")
    _require(x, name)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    amax, _, bad = _run_amax(_view_3d(x, False), row_rht=rht, sign_mask=_sign_mask(rht_sign) if rht else 0)
    if nonfinite is not None:
        nonfinite.add_(bad.sum().to(nonfinite.dtype))
    elif bool(bad.any()):
        raise ValueError(f"{name}: contains NaN or inf values; its amax is not defined for NVFP4 scaling")
    return amax


_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check_parts(parts: NVFP4Parts, name: str):
    if parts.packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed must be uint8, got {parts.packed.dtype}")
    if parts.block_scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"{name}: block_scale must be float8_e4m3fn, got {parts.block_scale.dtype}")
    K = parts.packed.shape[-1] * 2 if parts.packed.ndim else 0
    if (parts.packed.ndim == 0 or parts.block_scale.shape[:-1] != parts.packed.shape[:-1]
            or parts.block_scale.shape[-1] * BLOCK_SIZE != K):
        raise ValueError(
            f"{name}: block_scale shape {tuple(parts.block_scale.shape)} does not match packed shape "
            f"{tuple(parts.packed.shape)} (expected [..., {K // BLOCK_SIZE}])"
        )


@torch.no_grad()
def dequantize(parts: NVFP4Parts, dtype: torch.dtype = torch.float32, *, name: str = "input") -> torch.Tensor:
    """``e2m1_value * (fp32(block_scale) * global_decode_scale)`` cast to ``dtype`` (RTNE); bit-identical to
    ``formats.nvfp4.dequantize_parts``.
    """
    _check_parts(parts, name)
    if dtype not in _OUT_KIND:
        raise TypeError(f"{name}: dequantize writes float32/bfloat16/float16, got {dtype}")
    packed = parts.packed
    _require(packed, name)
    K = packed.shape[-1] * 2
    out_shape = (*packed.shape[:-1], K)
    if packed.numel() == 0:
        return torch.zeros(out_shape, dtype=dtype, device=packed.device)
    p2 = packed.reshape(-1, K // 2).contiguous()
    s2 = parts.block_scale.view(torch.uint8).reshape(-1, K // BLOCK_SIZE).contiguous()
    sdec = parts.global_decode_scale.float().reshape(1).to(packed.device)
    R = p2.shape[0]
    out = torch.empty(R, K, dtype=dtype, device=packed.device)
    out_arg = out.view(torch.int16) if dtype == torch.bfloat16 else out
    br, bk = _tiles("deq")
    _dequantize_kernel[(triton.cdiv(R, br), triton.cdiv(K, bk))](p2, s2, sdec, out_arg, R, K, BLOCK_R=br,
                                                                 BLOCK_K=bk, OUT_KIND=_OUT_KIND[dtype])
    return out.reshape(out_shape)


@torch.no_grad()
def nvfp4_gemm(a: NVFP4Parts, b: NVFP4Parts, out_dtype: torch.dtype = torch.float32, *,
               tile=(32, 32, 64)) -> torch.Tensor:
    """Emulated NVFP4 GEMM ``a [..., M, K] @ b [N, K]^T``: ``tl.dot`` on dequantized tiles (exact in
    tf32) with float32 accumulation, times ``g_a * g_b`` once at the end. Equals
    ``formats.gemm.nvfp4_gemm`` up to the float32 summation order (bit-identical when the sums are exact).
    """
    _check_parts(a, "a")
    _check_parts(b, "b")
    ka, kb = a.packed.shape[-1] * 2, b.packed.shape[-1] * 2
    if ka != kb or b.packed.ndim != 2:
        raise ValueError(
            f"nvfp4_gemm: operands must share K along their last dim, got a {tuple(a.packed.shape[:-1])}x{ka} "
            f"and b {tuple(b.packed.shape[:-1])}x{kb}"
        )
    if out_dtype not in _OUT_KIND:
        raise TypeError(f"nvfp4_gemm: out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    _require(a.packed, "a")
    bm, bn, bk = tile
    _check_tile((bm, bn))
    _check_tile((bk, bk))
    K = ka
    a_p = a.packed.reshape(-1, K // 2).contiguous()
    a_s = a.block_scale.view(torch.uint8).reshape(-1, K // BLOCK_SIZE).contiguous()
    b_p = b.packed.contiguous()
    b_s = b.block_scale.view(torch.uint8).contiguous()
    M, N = a_p.shape[0], b_p.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=a.packed.device)
    if M and N:
        alpha = (a.global_decode_scale.float() * b.global_decode_scale.float()).reshape(1).to(out.device)
        out_arg = out.view(torch.int16) if out_dtype == torch.bfloat16 else out
        if K == 0:
            out.zero_()
        else:
            _gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                a_p, a_s, b_p, b_s, alpha, out_arg, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                OUT_KIND=_OUT_KIND[out_dtype])
    return out.reshape(*a.packed.shape[:-1], N)


@torch.no_grad()
def mxfp8_quantize(x: torch.Tensor, scale_rule: str = "rceil", *, name: str = "input") -> MXParts:
    """MXFP8 (E4M3 elements, E8M0 scale per 32 along the last dim); bit-identical to
    ``formats.mx.mx_quantize(x, "e4m3", scale_rule)``.
    """
    if scale_rule not in ("rceil", "floor"):
        raise ValueError(f"scale_rule must be 'rceil' or 'floor', got {scale_rule!r}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: MX formats quantize floating tensors, got {getattr(x, 'dtype', type(x))}")
    if x.ndim == 0 or x.shape[-1] % MX_BLOCK_SIZE:
        raise ValueError(f"{name}: last dim must be a multiple of {MX_BLOCK_SIZE}, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        if x.dtype != torch.float64:
            raise TypeError(f"{name}: MXFP8 quantize reads float32/bfloat16/float16/float64, got {x.dtype}")
        x = x.float()
    _require(x, name)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    R = x2.shape[0]
    data = torch.empty(R, K, dtype=torch.uint8, device=x.device)
    scale = torch.empty(R, K // MX_BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    if x2.numel():
        br, bk = _tiles("mx")
        grid = (triton.cdiv(R, br), triton.cdiv(K, bk))
        bad = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
        _mxfp8_kernel[grid](x2, R, K, x2.stride(0), x2.stride(1), data, scale, bad, BLOCK_R=br, BLOCK_K=bk,
                            RCEIL=scale_rule == "rceil")
        if bool(bad.any()):
            ref_mx.mx_quantize(x, "e4m3", scale_rule, name)  # raises the reference's NaN/inf message
            raise ValueError(f"{name}: contains NaN or inf values; MX formats have no encoding for them")
    return MXParts(data.view(torch.float8_e4m3fn).reshape(x.shape),
                   scale.view(torch.float8_e8m0fnu).reshape(*x.shape[:-1], K // MX_BLOCK_SIZE), "e4m3")
