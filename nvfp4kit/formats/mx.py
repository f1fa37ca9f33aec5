"""MXFP8 and MXFP4 (OCP microscaling): one E8M0 power-of-two scale per 32 elements.

* MXFP8: E4M3 elements (max 448). Used by the Nemotron 3 recipe for Mamba ``out_proj``.
* MXFP4: E2M1 elements (max 6), packed two a byte like NVFP4. Mostly a comparison format.

Two scale rules exist in practice:

* ``"rceil"`` (default; Transformer Engine and Blackwell hardware): ``2**ceil(log2(amax / elem_max))``,
  so the block max never saturates.
* ``"floor"`` (the OCP spec's rule): ``2**(floor(log2(amax)) - elem_emax)``; the largest elements
  may saturate to the element max.

An all-zero block gets the smallest scale, 2**-127.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .e2m1 import E2M1_MAX, e2m1_decode, e2m1_round_nearest, pack_nibbles, unpack_nibbles
from .nvfp4 import check_finite_values
from .scales import E4M3_MAX, ceil_log2, e4m3_rtne, e8m0_from_exponent, e8m0_to_float, floor_log2

MX_BLOCK_SIZE = 32
MXElement = Literal["e4m3", "e2m1"]
MXScaleRule = Literal["rceil", "floor"]

_ELEM_MAX = {"e4m3": E4M3_MAX, "e2m1": E2M1_MAX}
_ELEM_EMAX = {"e4m3": 8, "e2m1": 2}  # exponent of the largest normal element


@dataclass(frozen=True)
class MXParts:
    """``data``: float8_e4m3fn [..., K] (MXFP8) or packed uint8 [..., K/2] (MXFP4);
    ``scale``: float8_e8m0fnu [..., K/32]."""

    data: torch.Tensor
    scale: torch.Tensor
    element: MXElement


def mx_scale_exponent(block_amax: torch.Tensor, element: MXElement, scale_rule: MXScaleRule) -> torch.Tensor:
    """Unbiased int32 exponent of each block's E8M0 scale, clamped to [-127, 127]."""
    amax = block_amax.float()
    positive = amax > 0
    safe = torch.where(positive, amax, torch.ones_like(amax))
    if scale_rule == "rceil":
        inv_max = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(_ELEM_MAX[element], dtype=torch.float32)
        ratio = safe * inv_max.to(safe.device)
        # ratio can underflow to 0 for tiny amax: treat as the smallest scale
        exp = torch.where(ratio > 0, ceil_log2(torch.where(ratio > 0, ratio, torch.ones_like(ratio))), -127)
    elif scale_rule == "floor":
        exp = floor_log2(safe) - _ELEM_EMAX[element]
    else:
        raise ValueError(f"scale_rule must be 'rceil' or 'floor', got {scale_rule!r}")
    exp = torch.where(positive, exp, torch.full_like(exp, -127))
    return exp.clamp(-127, 127).to(torch.int32)


@torch.no_grad()
def mx_quantize(
    x: torch.Tensor, element: MXElement = "e4m3", scale_rule: MXScaleRule = "rceil", name: str = "input"
) -> MXParts:
    """Quantize along the last dim in blocks of 32. Same input policy as NVFP4 (finite floats)."""
    if element not in _ELEM_MAX:
        raise ValueError(f"element must be 'e4m3' (MXFP8) or 'e2m1' (MXFP4), got {element!r}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name}: MX formats quantize floating tensors, got {getattr(x, 'dtype', type(x))}")
    if x.ndim == 0 or x.shape[-1] % MX_BLOCK_SIZE:
        raise ValueError(f"{name}: last dim must be a multiple of {MX_BLOCK_SIZE}, got shape {tuple(x.shape)}")
    check_finite_values(x, name, "MXFP8" if element == "e4m3" else "MXFP4")
    xf = x.float()
    K = xf.shape[-1]
    xb = xf.reshape(*xf.shape[:-1], K // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    b_amax = xb.abs().amax(-1) if xb.numel() else xb.new_zeros(xb.shape[:-1])
    exp = mx_scale_exponent(b_amax, element, scale_rule)
    # 2**-exp is exact in float32 for exp in [-127, 127] (2**-127 is a subnormal)
    inv = torch.ldexp(torch.ones_like(b_amax), (-exp).float())
    scaled = xb * inv.unsqueeze(-1)
    if element == "e4m3":
        data = e4m3_rtne(scaled).reshape(xf.shape)
    else:
        codes = e2m1_round_nearest(torch.clamp(scaled, -E2M1_MAX, E2M1_MAX))
        data = pack_nibbles(codes.reshape(xf.shape))
    return MXParts(data, e8m0_from_exponent(exp), element)


def mx_dequantize(parts: MXParts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``element_value * 2**exp`` per block, cast to ``dtype``."""
    if parts.element == "e4m3":
        vals = parts.data.float()
    else:
        vals = e2m1_decode(unpack_nibbles(parts.data))
    K = vals.shape[-1]
    scale = e8m0_to_float(parts.scale)
    if scale.shape[-1] * MX_BLOCK_SIZE != K:
        raise ValueError(f"mx_dequantize: scale shape {tuple(scale.shape)} does not match data of K={K}")
    vb = vals.reshape(*vals.shape[:-1], K // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    return (vb * scale.unsqueeze(-1)).reshape(vals.shape).to(dtype)


def mxfp8_quantize(x: torch.Tensor, scale_rule: MXScaleRule = "rceil") -> MXParts:
    return mx_quantize(x, "e4m3", scale_rule)


def mxfp4_quantize(x: torch.Tensor, scale_rule: MXScaleRule = "rceil") -> MXParts:
    return mx_quantize(x, "e2m1", scale_rule)
