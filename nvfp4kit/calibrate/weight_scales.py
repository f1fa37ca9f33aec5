"""How a Linear's weight becomes NVFP4 (or FP8): the weight-scale methods of PTQ.

* ``max``    round-to-nearest with max-based block scales (each 1x16 block's amax maps to 6).
* ``mse``    per block, search the E4M3 scale codes near the max-based one (a few steps below,
             which clip the block max, and above) and keep the one with the smallest squared error
             of the block; ties keep the max-based scale, so no block is ever worse than ``max``.
* ``4over6`` Four Over Six: per block, the max mapped to 6 or to 4, whichever has the lower error
             (tensor scale with 6*256 headroom).
* ``gptq``   error feedback (GPTQ) on NVFP4 blocks: columns are quantized left to right; each
             column's rounding error is spread over the not-yet-quantized columns through the
             Cholesky factor of the damped inverse Hessian ``H = X^T X`` of the calibration inputs.
             A 16-column group's block scales are fixed when the group's first column is reached,
             chosen on the error-updated weights by the ``mse`` search (``gptq_weight_parts`` also
             offers the plain max rule). With activation order (``act_order``, GPTQ's "static"
             order) the columns are instead quantized in decreasing order of the Hessian diagonal
             (the inputs with the most energy first) with every block scale chosen beforehand on
             the original weights, so the 16-element blocks of the checkpoint stay contiguous.

All methods take an optional ``global_amax``: fused groups (q/k/v, gate/up) pass the group's
shared amax so every member gets the same global scale.
"""

from __future__ import annotations

import torch

from ..formats.e2m1 import E2M1_MAX, e2m1_decode, e2m1_round_nearest, pack_nibbles
from ..formats.nvfp4 import BLOCK_SIZE, NVFP4Parts, check_quantizable
from ..formats.scales import (
    decode_from_encode,
    global_encode_scale,
    nvfp4_block_encode_scale,
    nvfp4_block_scale,
    tensor_amax,
)
from ..kernels.dispatch import quantize_parts, search_kernel

WEIGHT_SCALE_METHODS = ("max", "mse", "4over6", "gptq")
# the method of ``nvfp4kit quantize`` and of every library entry point that takes one
DEFAULT_WEIGHT_SCALE = "gptq"
# E4M3 code offsets tried by ``mse`` around the max-based scale (8 codes = a factor of 2)
MSE_CODE_OFFSETS = tuple(range(-6, 3))
_E4M3_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN in float8_e4m3fn
# GPTQ's column order: the Hessian-diagonal (activation) order when True, left to right when False.
# Measured (bench/ptq.py): it helps GPTQ alone but not after the default AWQ smoothing, so it is off.
GPTQ_ACT_ORDER = False


def _amax_of(w: torch.Tensor, global_amax) -> torch.Tensor:
    """The weight's own amax, or the given (shared) one, as a float32 0-dim tensor."""
    if global_amax is None:
        return tensor_amax(w)
    amax = torch.as_tensor(global_amax, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(amax)) or float(amax) < 0:
        raise ValueError(f"global_amax must be finite and non-negative, got {float(amax)}")
    return amax


def _sum16(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (16) in one fixed order, halves added pairwise (8+8, 4+4, 2+2, 1+1):
    the same bits on every device and in the compiled GPTQ kernel, where ``sum(-1)`` would follow
    each backend's own reduction order."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def _block_errors(xb: torch.Tensor, s_b: torch.Tensor, s_dec: torch.Tensor):
    """Codes and float64 squared error per block for E4M3 block scales ``s_b`` ([..., nb])."""
    enc_b = nvfp4_block_encode_scale(s_b, s_dec)
    codes = e2m1_round_nearest(torch.clamp(xb * enc_b.unsqueeze(-1), -E2M1_MAX, E2M1_MAX))
    deq = e2m1_decode(codes) * (s_b.float() * s_dec).unsqueeze(-1)
    err = _sum16((deq.double() - xb.double()).square())
    return codes, err


def mse_weight_parts(w: torch.Tensor, global_amax=None, offsets=MSE_CODE_OFFSETS, rows_per_chunk: int = 1024,
                     name: str = "weight", backend: str = "auto") -> NVFP4Parts:
    """NVFP4 parts whose block scales minimise each block's squared error among E4M3 candidates.

    Runs in the compiled CPU kernel where ``kernels.dispatch.search_kernel`` offers it (same bits
    as the torch loop below, which ``backend="torch"`` forces)."""
    check_quantizable(w, name)
    if 0 not in offsets:
        offsets = (0, *offsets)
    s_enc = global_encode_scale(_amax_of(w, global_amax))
    s_dec = decode_from_encode(s_enc)
    K = w.shape[-1]
    flat = w.detach().reshape(-1, K)
    kernel = search_kernel(flat[:0].float(), backend)  # the chunks are float32 on w's device
    tables = kernel.ScaleTables(s_enc, s_dec, offsets) if kernel else None
    packed_rows, scale_rows = [], []
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[r0:r0 + rows_per_chunk].float()
        if kernel is not None:
            packed, scale = kernel.mse_encode(chunk, tables)
            packed_rows.append(packed)
            scale_rows.append(scale.view(torch.float8_e4m3fn))
            continue
        xb = chunk.reshape(-1, K // BLOCK_SIZE, BLOCK_SIZE)
        s_max = nvfp4_block_scale(xb.abs().amax(-1), s_enc)
        best_codes, best_err = _block_errors(xb, s_max, s_dec)
        best_scale = s_max
        base = s_max.view(torch.uint8).to(torch.int16)
        nonzero = base > 0
        for d in offsets:
            if d == 0:
                continue
            cand_code = (base + d).clamp(1, _E4M3_MAX_CODE).to(torch.uint8)
            cand = torch.where(nonzero, cand_code, base.to(torch.uint8)).view(torch.float8_e4m3fn)
            codes, err = _block_errors(xb, cand, s_dec)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
            best_scale = torch.where(better, cand.float(), best_scale.float()).to(torch.float8_e4m3fn)
        packed_rows.append(pack_nibbles(best_codes.reshape(-1, K)))
        scale_rows.append(best_scale.reshape(-1, K // BLOCK_SIZE))
    packed = torch.cat(packed_rows).reshape(*w.shape[:-1], K // 2)
    block_scale = torch.cat(scale_rows).reshape(*w.shape[:-1], K // BLOCK_SIZE)
    return NVFP4Parts(packed, block_scale, s_dec.reshape(()))


def _lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]
    (two thirds of the work of a triangular solve against the identity, all of it in matrix products)."""
    n = L.shape[0]
    if n <= 512:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    a_inv = _lower_triangular_inverse(L[:h, :h])
    c_inv = _lower_triangular_inverse(L[h:, h:])
    out = torch.zeros_like(L)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    out[h:, :h] = -(c_inv @ (L[h:, :h] @ a_inv))
    return out


def gptq_hessian_factor(hessian: torch.Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``H^-1 = U^T U``) that GPTQ
    spreads errors with; inputs that never fired (zero diagonal) get a unit diagonal first. Weights that
    share one Hessian (q/k/v, gate/up) share this factor.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky factorization
    and one triangular inverse, instead of a factorization, an inversion and a second factorization."""
    H = hessian.to(dtype).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    diag += damp * mean_diag
    H = H.flip(0, 1)
    diag = torch.diagonal(H)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        diag += damp * mean_diag * (10 ** attempt)  # not positive definite: add more damping
    else:
        raise ValueError("gptq: the calibration Hessian is not positive definite even after damping")
    return _lower_triangular_inverse(L).flip(0, 1).contiguous()


def gptq_column_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's activation order: column indices by decreasing Hessian diagonal (ties by index)."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def gptq_factor(hessian: torch.Tensor, act_order: bool | None = None, damp: float = 0.01,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The factor :func:`gptq_weight_parts` uses for ``hessian``: :func:`gptq_hessian_factor` of the Hessian
    in the column order GPTQ runs (permuted by :func:`gptq_column_order` with ``act_order``; None:
    :data:`GPTQ_ACT_ORDER`)."""
    if GPTQ_ACT_ORDER if act_order is None else act_order:
        perm = gptq_column_order(hessian)
        hessian = hessian[perm][:, perm]
    return gptq_hessian_factor(hessian, damp, dtype)


def _gptq_static_columns(W1, Err1, U1, codes, enc_cols, deq_cols, dtype) -> None:
    """One lazy block of columns whose block scales were fixed beforehand (activation order):
    ``enc_cols`` / ``deq_cols`` ``[N, L]`` are each column's block encode / decode scale."""
    for i in range(W1.shape[1]):
        wcol = W1[:, i]
        c = e2m1_round_nearest(torch.clamp(wcol.float() * enc_cols[:, i], -E2M1_MAX, E2M1_MAX))
        codes[:, i] = c
        q = e2m1_decode(c, dtype) * deq_cols[:, i]
        err = (wcol - q) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err


def _mse_block_scale(xb: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor, offsets=MSE_CODE_OFFSETS):
    """E4M3 scales ``[rows]`` minimising each row's squared error on blocks ``xb`` ``[rows, 16]``."""
    s_max = nvfp4_block_scale(xb.abs().amax(-1), s_enc)
    _, best_err = _block_errors(xb, s_max, s_dec)
    best = s_max
    base = s_max.view(torch.uint8).to(torch.int16)
    for d in offsets:
        if d == 0:
            continue
        cand = torch.where(base > 0, (base + d).clamp(1, _E4M3_MAX_CODE), base).to(torch.uint8)
        cand = cand.view(torch.float8_e4m3fn)
        _, err = _block_errors(xb, cand, s_dec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand.float(), best.float()).to(torch.float8_e4m3fn)
    return best


def _gptq_lazy_block(W1, Err1, U1, codes, scales, s_enc, s_dec, group_scale: str, dtype) -> None:
    """The reference loop over one lazy block's columns, in place (the compiled twin:
    ``kernels.cpu.gptq_lazy_block``). ``codes`` ``[N, L]`` and ``scales`` ``[N, L/16]`` are views
    into the outputs."""
    enc_b = deq_b = None
    for i in range(W1.shape[1]):
        if i % BLOCK_SIZE == 0:
            group = W1[:, i:i + BLOCK_SIZE].float()
            if group_scale == "mse":
                s_b = _mse_block_scale(group, s_enc, s_dec)
            else:
                s_b = nvfp4_block_scale(group.abs().amax(-1), s_enc)
            scales[:, i // BLOCK_SIZE] = s_b
            enc_b = nvfp4_block_encode_scale(s_b, s_dec)
            deq_b = (s_b.float() * s_dec).to(dtype)
        wcol = W1[:, i]
        c = e2m1_round_nearest(torch.clamp(wcol.float() * enc_b, -E2M1_MAX, E2M1_MAX))
        codes[:, i] = c
        q = e2m1_decode(c, dtype) * deq_b
        err = (wcol - q) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err


def gptq_weight_parts(w: torch.Tensor, hessian: torch.Tensor, global_amax=None, damp: float = 0.01,
                      lazy_block: int = 128, group_scale: str = "max", name: str = "weight",
                      backend: str = "auto", factor: torch.Tensor | None = None,
                      act_order: bool | None = None) -> NVFP4Parts:
    """GPTQ on NVFP4 1x16 blocks (see the module docs). ``hessian``: ``[K, K]`` sum of ``x^T x``.

    ``group_scale``: how a 16-column group's block scales are chosen from the (error-updated)
    weights when the group starts: ``"max"`` (block max maps to 6) or ``"mse"`` (the E4M3
    candidate with the smallest squared error of the block, as the ``mse`` method does).
    Computes in float64 when ``w`` is float64, else float32, on ``w``'s device. The columns of a
    lazy block run in the compiled CPU kernel where ``kernels.dispatch.search_kernel`` offers it
    (float32 on CPU; same bits as the torch loop, which ``backend="torch"`` forces). ``factor``: the
    :func:`gptq_factor` of ``hessian`` when the caller already has it (weights sharing a Hessian).
    ``act_order``: columns in decreasing Hessian-diagonal order, block scales chosen beforehand on the
    original weights by ``group_scale`` (the torch loop; see the module docs); None: :data:`GPTQ_ACT_ORDER`.
    """
    act_order = GPTQ_ACT_ORDER if act_order is None else act_order
    if group_scale not in ("max", "mse"):
        raise ValueError(f"{name}: gptq group_scale must be 'max' or 'mse', got {group_scale!r}")
    check_quantizable(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name}: gptq needs a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    if hessian.shape != (K, K):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match the weight's K={K}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: the calibration Hessian has NaN/inf entries")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    lazy_block = max(BLOCK_SIZE, lazy_block - lazy_block % BLOCK_SIZE)
    W = w.detach().to(dtype).clone()
    s_enc = global_encode_scale(_amax_of(w, global_amax)).to(W.device)
    s_dec = decode_from_encode(s_enc)
    if factor is None:
        factor = gptq_factor(hessian.to(W.device), act_order, damp, dtype)
    elif factor.shape != (K, K) or factor.dtype != dtype:
        raise ValueError(f"{name}: the Hessian factor must be [{K}, {K}] {dtype}, got {tuple(factor.shape)} {factor.dtype}")
    U = factor.to(W.device)
    if act_order:
        if group_scale == "mse":  # the mse method's scales of the original weights (its compiled search)
            s_b = mse_weight_parts(w.detach(), _amax_of(w, global_amax), name=name, backend=backend).block_scale
        else:
            s_b = nvfp4_block_scale(W.float().reshape(-1, BLOCK_SIZE).abs().amax(-1), s_enc)
        return _gptq_act_order(W, hessian, U, s_b.reshape(N, K // BLOCK_SIZE), s_dec, lazy_block, dtype)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(N, K // BLOCK_SIZE, dtype=torch.uint8, device=W.device)
    kernel = search_kernel(W, backend)
    tables = kernel.ScaleTables(s_enc, s_dec, MSE_CODE_OFFSETS if group_scale == "mse" else ()) if kernel else None
    for i1 in range(0, K, lazy_block):
        i2 = min(i1 + lazy_block, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        c1, s1 = codes[:, i1:i2], scales[:, i1 // BLOCK_SIZE:i2 // BLOCK_SIZE]
        if kernel is not None:
            kernel.gptq_lazy_block(W1, Err1, U1, c1, s1, tables)
        else:
            _gptq_lazy_block(W1, Err1, U1, c1, s1.view(torch.float8_e4m3fn), s_enc, s_dec, group_scale, dtype)
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return NVFP4Parts(pack_nibbles(codes), scales.view(torch.float8_e4m3fn), s_dec.reshape(()))


def _gptq_act_order(W, hessian, U, s_b, s_dec, lazy_block: int, dtype) -> NVFP4Parts:
    """GPTQ in activation order (see :func:`gptq_weight_parts`) with the block scales ``s_b`` ``[N, K/16]``
    fixed beforehand; ``U``: the factor of the permuted Hessian."""
    N, K = W.shape
    perm = gptq_column_order(hessian.to(W.device))
    enc_cols = nvfp4_block_encode_scale(s_b, s_dec).repeat_interleave(BLOCK_SIZE, 1)[:, perm]
    deq_cols = (s_b.float() * s_dec).to(dtype).repeat_interleave(BLOCK_SIZE, 1)[:, perm]
    Wp = W[:, perm].contiguous()
    codes_p = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, lazy_block):
        i2 = min(i1 + lazy_block, K)
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        _gptq_static_columns(W1, Err1, U[i1:i2, i1:i2], codes_p[:, i1:i2], enc_cols[:, i1:i2], deq_cols[:, i1:i2], dtype)
        if i2 < K:
            Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    return NVFP4Parts(pack_nibbles(codes), s_b, s_dec.reshape(()))


def nvfp4_weight_parts(w: torch.Tensor, method: str = "max", global_amax=None, hessian: torch.Tensor | None = None,
                       name: str = "weight", gptq_damp: float = 0.01,
                       hessian_factor: torch.Tensor | None = None) -> NVFP4Parts:
    """Quantize a weight ``[N, K]`` to NVFP4 parts with one of ``WEIGHT_SCALE_METHODS``
    (``hessian_factor``: see :func:`gptq_weight_parts`'s ``factor``)."""
    if method == "max":
        return quantize_parts(w.detach(), global_amax=_amax_of(w, global_amax), name=name)
    if method == "4over6":
        return quantize_parts(w.detach(), global_amax=_amax_of(w, global_amax), scale_rule="4over6", name=name)
    if method == "mse":
        return mse_weight_parts(w, global_amax, name=name)
    if method == "gptq":
        if hessian is None:
            raise ValueError(f"{name}: weight scale 'gptq' needs the calibration Hessian of this layer's inputs")
        return gptq_weight_parts(w, hessian, global_amax, damp=gptq_damp, group_scale="mse", name=name,
                                 factor=hessian_factor)
    raise ValueError(f"weight scale method must be one of {', '.join(WEIGHT_SCALE_METHODS)}, got {method!r}")


__all__ = [
    "DEFAULT_WEIGHT_SCALE",
    "WEIGHT_SCALE_METHODS",
    "GPTQ_ACT_ORDER",
    "gptq_column_order",
    "gptq_factor",
    "gptq_hessian_factor",
    "gptq_weight_parts",
    "mse_weight_parts",
    "nvfp4_weight_parts",
]
