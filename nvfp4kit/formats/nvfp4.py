"""NVFP4 quantize / dequantize: the reference implementation in the canonical formula order.

Layout of the parts (all libraries agree on it, and it is what checkpoints store):

* ``packed``       uint8   ``[..., K/2]``  two E2M1 codes a byte, element 2i in the low nibble
* ``block_scale``  float8_e4m3fn ``[..., K/16]``  one scale per 16 elements along K; in 2D
                   (16x16) mode one scale per tile, repeated for each of the tile's 16 rows
* ``global_decode_scale``  float32 0-dim, ``1 / S_enc`` (amax / 2688)

Formula order (Transformer Engine's kernel order; see ``numerics.md`` section 2)::

    S_enc = min(2688 / amax, FLT_MAX)       (1 if amax is 0)
    S_dec = 1 / S_enc
    s_b   = e4m3_rtne(min(block_amax * (S_enc * (1/6)), FLT_MAX))
    enc_b = min(1 / (fp32(s_b) * S_dec), FLT_MAX)
    code  = e2m1_round(clamp(x * enc_b, -6, 6))
    x_hat = e2m1_value(code) * (fp32(s_b) * S_dec)

Input policy (tested): floating dtypes only; K (the last dim) must be a multiple of 16; NaN and
+-inf raise ``ValueError`` (NVFP4 has no encoding for them); float64 values beyond the float32 range
raise; empty tensors and all-zero tensors/blocks are fine (scale 0, codes +-0 with the input's sign bit,
dequantize to 0). Quantization never records autograd history.
A caller-supplied ``global_amax`` smaller than the data saturates: block scales clamp at 448 and
elements at +-6. Except ``global_amax = 0`` (an all-zero tensor's amax): the formula above then takes
S_enc = 1, so data quantized with it gets block scales e4m3(block_amax / 6) and saturates only in blocks
whose amax exceeds 2688 (documented, tested; the bits of every other case are unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .e2m1 import E2M1_MAX, e2m1_decode, e2m1_round_nearest, e2m1_round_stochastic, pack_nibbles, unpack_nibbles
from .scales import (
    FP32_MAX,
    NVFP4_RANGE,
    decode_from_encode,
    global_encode_scale,
    nvfp4_block_encode_scale,
    nvfp4_block_scale,
)

BLOCK_SIZE = 16
Block = tuple[int, int]
Rounding = Literal["nearest", "stochastic"]
ScaleRule = Literal["max", "4over6"]

BLOCK_1D: Block = (1, BLOCK_SIZE)
BLOCK_2D: Block = (BLOCK_SIZE, BLOCK_SIZE)
# Four Over Six keeps headroom in the tensor scale: 6 * 256 instead of 6 * 448.
FOUR_OVER_SIX_RANGE = E2M1_MAX * 256.0


@dataclass(frozen=True)
class NVFP4Parts:
    """The stored parts of one NVFP4 tensor (row layout: blocks along the last dim)."""

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_decode_scale: torch.Tensor
    block: Block = BLOCK_1D


# ----------------------------------------------------------------------------- input checks


def check_quantizable(x: torch.Tensor, name: str = "input", block: Block = BLOCK_1D) -> None:
    """Raise a clear error if ``x`` cannot be quantized to NVFP4 with this block shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1:  # no 8-bit float formats as input
        raise TypeError(f"{name}: NVFP4 quantizes float32/bfloat16/float16/float64 tensors, got {x.dtype}")
    if block not in (BLOCK_1D, BLOCK_2D):
        raise ValueError(f"{name}: block must be (1, 16) or (16, 16), got {block}")
    if x.ndim == 0:
        raise ValueError(f"{name}: cannot quantize a 0-dim tensor (blocks run along the last dim)")
    if block == BLOCK_2D and x.ndim < 2:
        raise ValueError(f"{name}: 16x16 blocks need a tensor of at least 2 dims, got shape {tuple(x.shape)}")
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: last dim must be a multiple of {BLOCK_SIZE} for NVFP4, got shape {tuple(x.shape)} "
            f"(pad K to {BLOCK_SIZE * -(-x.shape[-1] // BLOCK_SIZE)} or keep this tensor in high precision)"
        )
    check_finite_values(x, name)


def check_finite_values(x: torch.Tensor, name: str = "input", fmt: str = "NVFP4") -> None:
    """Raise ``ValueError`` for NaN/inf, and for float64 values beyond the float32 range."""
    if x.numel() == 0:
        return
    if x.dtype == torch.float64:
        finite = torch.isfinite(x)
        if bool(finite.all()) and bool((x.abs() > FP32_MAX).any()):
            raise ValueError(f"{name}: values beyond the float32 range ({FP32_MAX:.3e}) cannot be scaled to {fmt}")
    else:
        finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name}: contains NaN or inf values ({n_nan} NaN, {n_inf} inf); {fmt} has no encoding for them "
            "(clean the tensor, or keep it in high precision)"
        )


def check_parts(packed: torch.Tensor, block_scale: torch.Tensor, global_decode_scale: torch.Tensor,
                block: Block = BLOCK_1D, name: str = "NVFP4 tensor", values: bool = True) -> None:
    """Raise a clear error (``TypeError`` for a dtype, ``ValueError`` otherwise, naming ``name``) unless the
    parts form a valid NVFP4 tensor: ``packed`` uint8 ``[..., K/2]`` with K a multiple of 16,
    ``block_scale`` float8_e4m3fn ``[..., K/16]``, ``global_decode_scale`` one float32, ``block`` (1, 16) or
    (16, 16). With ``values`` (parts read from outside; a pass over the scales) also: no NaN and no
    negative block scale, a finite positive global decode scale (the canonical formula never makes 0 or
    inf: an all-zero tensor has 1), and 16x16 scales equal within each tile of 16 rows."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed must be uint8, got {packed.dtype}")
    if block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{name}: block_scale must be float8_e4m3fn, got {block_scale.dtype}")
    if tuple(block) not in (BLOCK_1D, BLOCK_2D):
        raise ValueError(f"{name}: block must be (1, 16) or (16, 16), got {tuple(block)}")
    if packed.ndim == 0 or (packed.shape[-1] * 2) % BLOCK_SIZE:
        raise ValueError(f"{name}: packed shape {tuple(packed.shape)} does not hold whole blocks of {BLOCK_SIZE} "
                         f"elements (its last dim must be a multiple of {BLOCK_SIZE // 2})")
    if tuple(block_scale.shape) != (*packed.shape[:-1], packed.shape[-1] * 2 // BLOCK_SIZE):
        raise ValueError(f"{name}: block_scale shape {tuple(block_scale.shape)} does not match packed "
                         f"{tuple(packed.shape)}")
    if tuple(block) == BLOCK_2D and packed.ndim < 2:
        raise ValueError(f"{name}: 16x16 blocks need at least 2 dims, got packed shape {tuple(packed.shape)}")
    if not values:
        return
    if global_decode_scale.dtype != torch.float32 or global_decode_scale.numel() != 1:
        raise TypeError(f"{name}: global_decode_scale must be one float32 value, got {global_decode_scale.dtype} "
                        f"of shape {tuple(global_decode_scale.shape)}")
    g = float(global_decode_scale.reshape(()))
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"{name}: global_decode_scale must be finite and > 0, got {g}")
    if block_scale.numel():
        s = block_scale.float()
        n_nan, n_neg = int(torch.isnan(s).sum()), int((s < 0).sum())
        if n_nan or n_neg:
            raise ValueError(f"{name}: block_scale has {n_nan} NaN and {n_neg} negative entries; E4M3 block "
                             "scales are >= 0 (the file is corrupt or was not written by an NVFP4 quantizer)")
        if tuple(block) == BLOCK_2D:
            bits = block_scale.view(torch.uint8)
            rows = torch.arange(bits.shape[-2], device=bits.device)
            first = bits.index_select(-2, rows // BLOCK_SIZE * BLOCK_SIZE)
            if not torch.equal(bits, first):
                raise ValueError(f"{name}: 16x16 blocks, but the block scales differ within a tile of "
                                 f"{BLOCK_SIZE} rows")


def _as_amax(global_amax, device) -> torch.Tensor:
    amax = torch.as_tensor(global_amax, dtype=torch.float32, device=device).reshape(())
    if not bool(torch.isfinite(amax)) or float(amax) < 0:
        raise ValueError(f"global_amax must be a finite, non-negative number, got {float(amax)}")
    return amax


# ----------------------------------------------------------------------------- block amax


def block_amax(x: torch.Tensor, block: Block = BLOCK_1D) -> torch.Tensor:
    """Amax per block, shaped like the stored block_scale ``[..., K/16]`` (2D: repeated per row)."""
    xa = x.float().abs()
    K = xa.shape[-1]
    if block == BLOCK_1D:
        return xa.reshape(*xa.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE).amax(-1) if xa.numel() else xa.new_zeros(
            (*xa.shape[:-1], K // BLOCK_SIZE)
        )
    M = xa.shape[-2]
    pad_rows = -M % BLOCK_SIZE
    if pad_rows:
        xa = F.pad(xa, (0, 0, 0, pad_rows))  # zeros never raise an amax
    Mp = M + pad_rows
    if xa.numel() == 0:
        return xa.new_zeros((*x.shape[:-1], K // BLOCK_SIZE))
    tiles = xa.reshape(*xa.shape[:-2], Mp // BLOCK_SIZE, BLOCK_SIZE, K // BLOCK_SIZE, BLOCK_SIZE)
    tile_amax = tiles.amax(dim=(-3, -1))  # [..., Mp/16, K/16]
    return tile_amax.repeat_interleave(BLOCK_SIZE, dim=-2)[..., :M, :]


# ----------------------------------------------------------------------------- quantize / dequantize


def _round(scaled: torch.Tensor, rounding: Rounding, generator) -> torch.Tensor:
    if rounding == "nearest":
        return e2m1_round_nearest(scaled)
    if rounding == "stochastic":
        return e2m1_round_stochastic(scaled, generator)
    raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def _codes_for_scale(xb: torch.Tensor, s_b: torch.Tensor, global_decode: torch.Tensor, rounding, generator):
    enc_b = nvfp4_block_encode_scale(s_b, global_decode)
    scaled = torch.clamp(xb * enc_b.unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    return _round(scaled, rounding, generator)


@torch.no_grad()
def quantize_parts(
    x: torch.Tensor,
    block: Block = BLOCK_1D,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: ScaleRule = "max",
    name: str = "input",
) -> NVFP4Parts:
    """Quantize ``x`` to NVFP4 parts with the plain torch reference path.

    ``scale_rule="4over6"`` is Four Over Six: the tensor scale keeps headroom (6*256) and each block
    tries its max mapped to 6 and to 4, keeping the lower squared error (ties keep the 6 mapping).
    """
    block = tuple(block)
    check_quantizable(x, name, block)
    xf = x.float()
    if global_amax is not None:
        amax = _as_amax(global_amax, x.device)
    elif xf.numel():
        amax = xf.abs().amax()
    else:
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
    if scale_rule == "max":
        range_max = NVFP4_RANGE
    elif scale_rule == "4over6":
        range_max = FOUR_OVER_SIX_RANGE
    else:
        raise ValueError(f"scale_rule must be 'max' or '4over6', got {scale_rule!r}")
    s_enc = global_encode_scale(amax, range_max).to(x.device)
    s_dec = decode_from_encode(s_enc)

    K = xf.shape[-1]
    xb = xf.reshape(*xf.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE)
    b_amax = block_amax(xf, block)
    s_b = nvfp4_block_scale(b_amax, s_enc)
    codes = _codes_for_scale(xb, s_b, s_dec, rounding, generator)
    if scale_rule == "4over6":
        s_b4 = nvfp4_block_scale(b_amax * 1.5, s_enc)
        codes4 = _codes_for_scale(xb, s_b4, s_dec, rounding, generator)
        err6 = _block_sq_error(xb, codes, s_b, s_dec, block)
        err4 = _block_sq_error(xb, codes4, s_b4, s_dec, block)
        use4 = err4 < err6
        s_b = torch.where(use4, s_b4.float(), s_b.float()).to(torch.float8_e4m3fn)
        codes = torch.where(use4.unsqueeze(-1), codes4, codes)
    packed = pack_nibbles(codes.reshape(*xf.shape))
    return NVFP4Parts(packed, s_b, s_dec.reshape(()), block)


def _block_sq_error(xb, codes, s_b, s_dec, block: Block) -> torch.Tensor:
    """Squared error per stored block entry; in 2D mode summed over the tile (then repeated per row)."""
    deq = e2m1_decode(codes) * (s_b.float() * s_dec).unsqueeze(-1)
    err = (deq - xb).square().sum(-1)  # [..., M, K/16]
    if block == BLOCK_1D:
        return err
    M = err.shape[-2]
    pad = -M % BLOCK_SIZE
    e = F.pad(err, (0, 0, 0, pad))
    tile = e.reshape(*e.shape[:-2], (M + pad) // BLOCK_SIZE, BLOCK_SIZE, e.shape[-1]).sum(-2)
    return tile.repeat_interleave(BLOCK_SIZE, dim=-2)[..., :M, :]


def dequantize_parts(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_decode_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x_hat = e2m1_value * (fp32(block_scale) * global_decode_scale)``, then cast to ``dtype``."""
    codes = unpack_nibbles(packed)
    K = codes.shape[-1]
    if block_scale.shape[-1] * BLOCK_SIZE != K or block_scale.shape[:-1] != codes.shape[:-1]:
        raise ValueError(
            f"dequantize: block_scale shape {tuple(block_scale.shape)} does not match packed shape "
            f"{tuple(packed.shape)} (expected [..., {K // BLOCK_SIZE}])"
        )
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE)
    scale = block_scale.float() * global_decode_scale.float()
    return (vals * scale.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def block_values(parts: NVFP4Parts) -> torch.Tensor:
    """E2M1 values times fp32 block scales (no global scale): exact in float32."""
    codes = unpack_nibbles(parts.packed)
    K = codes.shape[-1]
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE)
    return (vals * parts.block_scale.float().unsqueeze(-1)).reshape(codes.shape)


def transpose_2d_parts(parts: NVFP4Parts) -> NVFP4Parts:
    """Exact transpose of a 16x16-block tensor's parts (last two dims); rows must be whole tiles."""
    if parts.block != BLOCK_2D:
        raise ValueError("transpose_2d_parts: only 16x16-block tensors transpose exactly")
    codes = unpack_nibbles(parts.packed)
    M = codes.shape[-2]
    if M % BLOCK_SIZE:
        raise ValueError(
            f"transpose: a 16x16-block tensor of shape {tuple(codes.shape)} has a partial row tile; "
            "its transpose would not have whole blocks along the last dim"
        )
    codes_t = codes.transpose(-1, -2).contiguous()
    tiles = parts.block_scale[..., ::BLOCK_SIZE, :]  # [..., M/16, K/16]
    scale_t = tiles.transpose(-1, -2).contiguous().repeat_interleave(BLOCK_SIZE, dim=-2)  # [..., K, M/16]
    return NVFP4Parts(pack_nibbles(codes_t), scale_t, parts.global_decode_scale, BLOCK_2D)
