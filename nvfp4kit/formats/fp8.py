"""Per-tensor FP8 (E4M3) with one float32 scale: the one formula every nvfp4kit path uses.

Formula order (decode direction)::

    s     = float32(amax / 448)              (1 where amax is 0)
    q     = e4m3_rtne(clamp(x / s, -448, 448))
    x_hat = float32(q) * s

Why this order: ``s`` is the number a checkpoint stores (modelopt ``weight_scale`` / ``input_scale``,
compressed-tensors ``weight_scale``, the KV cache's ``k_scale`` / ``v_scale``) and the number serving
engines divide by, so values computed here in memory are bit for bit the values a loader computes
from the stored scale. Multiplying by an encode-direction ``448 / amax`` instead rounds differently
for some inputs, and its reciprocal need not be the stored scale.

``s`` is computed in float64 and rounded once. For a float32 ``amax`` this equals the float32 division
``amax / 448`` exactly (448 = 7 * 2**6: no double rounding), and for an amax read back from a stored
scale (``s * 448``, exact in float64 but not always a float32) it gives back ``s`` itself.
"""

from __future__ import annotations

import torch

from .nvfp4 import check_finite_values
from .scales import E4M3_MAX, e4m3_rtne, tensor_amax


def fp8_scale(amax) -> torch.Tensor:
    """The decode scale ``float32(amax / 448)`` (1.0 for a zero amax), a 0-dim float32 tensor on amax's device."""
    if isinstance(amax, torch.Tensor):
        device, a = amax.device, amax.detach().to(torch.float64).reshape(())
    else:  # a Python float is a float64: not rounded to float32 first
        device, a = torch.device("cpu"), torch.tensor(float(amax), dtype=torch.float64)
    if not bool(torch.isfinite(a)) or float(a) < 0:
        raise ValueError(f"FP8 amax must be finite and non-negative, got {float(a)}")
    s = torch.where(a > 0, a / E4M3_MAX, torch.ones_like(a))
    return s.to(torch.float32).to(device)


def fp8_quantize(x: torch.Tensor, amax=None, scale: torch.Tensor | None = None, name: str = "input"):
    """``(float8_e4m3fn values, float32 0-dim scale)`` of ``x`` with the scale of ``amax`` (default:
    ``x``'s own amax), or with a given ``scale``. Values beyond the amax saturate at +-448."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: FP8 quantizes floating tensors, got {x.dtype}")
    check_finite_values(x, name, "FP8 E4M3")
    if scale is None:
        scale = fp8_scale(tensor_amax(x) if amax is None else amax)
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
    return e4m3_rtne(x.detach().float() / scale), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float32(q) * scale``, cast to ``dtype``."""
    return (q.float() * scale.float().reshape(())).to(dtype)


def fp8_fake_quant(x: torch.Tensor, amax=None, name: str = "input") -> torch.Tensor:
    """Quantize-dequantize ``x`` per tensor to FP8 E4M3 (no autograd), in ``x``'s dtype."""
    q, s = fp8_quantize(x, amax, name=name)
    return fp8_dequantize(q, s, x.dtype)


__all__ = ["fp8_dequantize", "fp8_fake_quant", "fp8_quantize", "fp8_scale"]
