"""Format-independent facts about a :class:`QuantizedModel`: each Linear's scheme, validation,
and dequantization to a plain state dict."""

from __future__ import annotations

import torch

from ..formats.nvfp4 import BLOCK_SIZE, dequantize_parts
from ..formats.scales import E4M3_MAX, NVFP4_RANGE
from .errors import CheckpointError
from .rules import check_shared_global_scales
from .types import KV_CACHE_FORMATS, QuantizedLinearWeight, QuantizedModel

# A Linear's scheme: weight format plus whether a static activation scale is stored.
NVFP4 = "nvfp4"  # W4A4: weight and input NVFP4, static input global scale
NVFP4_W4A16 = "nvfp4-w4a16"  # weight-only NVFP4
FP8 = "fp8"  # W8A8 FP8, per-tensor static scales
FP8_W8A16 = "fp8-w8a16"  # weight-only FP8
SCHEMES = (NVFP4, NVFP4_W4A16, FP8, FP8_W8A16)

# per-tensor activation scales from a calibrated amax
NVFP4_ACT_RANGE = NVFP4_RANGE  # 6 * 448
FP8_RANGE = E4M3_MAX  # 448


def scheme_of(lw: QuantizedLinearWeight) -> str | None:
    """The scheme of a quantized Linear, or None if it is kept in high precision."""
    if lw.format == "nvfp4":
        return NVFP4 if lw.input_amax is not None else NVFP4_W4A16
    if lw.format == "fp8":
        return FP8 if lw.input_amax is not None else FP8_W8A16
    return None


def input_decode_scale(amax: float, range_max: float) -> torch.Tensor:
    """Static activation scale in the decode direction, float32(amax / range_max), as a 0-dim tensor.

    Computed in float64 and rounded once, so a scale read back from a checkpoint
    (``amax = scale * range_max``, exact in float64) is written back bit for bit.
    """
    return torch.tensor(float(amax) / range_max, dtype=torch.float64).to(torch.float32)


def _emulated_encode_scale(amax: float, range_max: float) -> float:
    # what the format core computes from a given amax: float32(range_max / float32(amax))
    a = torch.tensor(float(amax), dtype=torch.float32)
    return float(torch.tensor(range_max, dtype=torch.float32) / a) if float(a) > 0 else 1.0


def exact_input_amax(amax: float, range_max: float, max_steps: int = 64) -> float:
    """A float32 activation amax within a few ulps of ``amax`` that both checkpoint formats carry exactly.

    The modelopt format stores ``amax / range_max`` and compressed-tensors ``range_max / amax``,
    each rounded to float32; read back, an arbitrary amax can come out one ulp away and then give
    a different activation encode scale than the model that was calibrated. The amax returned is
    a fixed point of both round trips (reading back either format gives the same encode scale,
    and the modelopt one the same amax), so a quantized model computes bit for bit the same before
    it is written and after it is loaded from either format. Returns ``amax`` itself when it is 0,
    not finite, or no such value lies within ``max_steps`` ulps.
    """
    a = float(torch.tensor(float(amax), dtype=torch.float32))
    if not (a > 0) or a == float("inf"):
        return float(amax)
    up = torch.tensor(float("inf"), dtype=torch.float32)
    cand = torch.tensor(a, dtype=torch.float32)
    for _ in range(max_steps):
        c = float(cand)
        s = _emulated_encode_scale(c, range_max)
        via_modelopt = amax_from_decode(input_decode_scale(c, range_max), range_max)
        via_ct = amax_from_encode(input_encode_scale(c, range_max), range_max)
        if (float(torch.tensor(via_modelopt, dtype=torch.float32)) == c
                and _emulated_encode_scale(via_modelopt, range_max) == s
                and _emulated_encode_scale(via_ct, range_max) == s):
            return c
        cand = torch.nextafter(cand, up)
    return float(amax)


def input_encode_scale(amax: float, range_max: float) -> torch.Tensor:
    """Static activation scale in the encode direction, float32(range_max / amax) (1 if amax is 0)."""
    if float(amax) == 0.0:
        return torch.ones((), dtype=torch.float32)
    return torch.tensor(range_max / float(amax), dtype=torch.float64).to(torch.float32)


def amax_from_decode(scale: torch.Tensor, range_max: float) -> float:
    return float(scale.double().reshape(-1)[0]) * range_max


def amax_from_encode(scale: torch.Tensor, range_max: float) -> float:
    s = float(scale.double().reshape(-1)[0])
    return range_max / s


def _check_amax(name: str, what: str, v) -> None:
    if v is None:
        return
    v = float(v)
    if not (v >= 0.0) or v == float("inf"):
        raise CheckpointError(f"{name}: {what} must be a finite non-negative number, got {v}")


def validate_linear(name: str, lw: QuantizedLinearWeight) -> None:
    """Raise :class:`CheckpointError` if a Linear's record is inconsistent (dtypes, shapes, K % 16)."""
    if len(lw.shape) != 2:
        raise CheckpointError(f"{name}: shape must be (N, K), got {lw.shape}")
    N, K = lw.shape
    _check_amax(name, "input_amax", lw.input_amax)
    if lw.format == "nvfp4":
        p = lw.nvfp4
        if p is None:
            raise CheckpointError(f"{name}: format 'nvfp4' but no nvfp4 parts")
        if K % BLOCK_SIZE:
            raise CheckpointError(f"{name}: K={K} is not a multiple of {BLOCK_SIZE}; keep this Linear in high precision")
        if p.packed.dtype != torch.uint8 or tuple(p.packed.shape) != (N, K // 2):
            raise CheckpointError(
                f"{name}: packed weight must be uint8 [{N}, {K // 2}], got {p.packed.dtype} {list(p.packed.shape)}"
            )
        if p.block_scale.dtype != torch.float8_e4m3fn or tuple(p.block_scale.shape) != (N, K // BLOCK_SIZE):
            raise CheckpointError(
                f"{name}: block scale must be float8_e4m3fn [{N}, {K // BLOCK_SIZE}], "
                f"got {p.block_scale.dtype} {list(p.block_scale.shape)}"
            )
        g = p.global_decode_scale
        # 0 is legal (an all-zero weight exported as amax / 2688); it dequantizes to zeros
        if g.numel() != 1 or not g.dtype.is_floating_point or not bool(torch.isfinite(g).all()) or float(g) < 0:
            raise CheckpointError(f"{name}: global decode scale must be one finite non-negative float, got {g}")
    elif lw.format == "fp8":
        w, s = lw.fp8_weight, lw.fp8_weight_scale
        if w is None or s is None:
            raise CheckpointError(f"{name}: format 'fp8' needs fp8_weight and fp8_weight_scale")
        if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (N, K):
            raise CheckpointError(f"{name}: fp8 weight must be float8_e4m3fn [{N}, {K}], got {w.dtype} {list(w.shape)}")
        if s.numel() != 1 or not bool(torch.isfinite(s.float()).all()) or float(s) <= 0:
            raise CheckpointError(f"{name}: fp8 weight scale must be one positive finite float, got {s}")
    else:
        if lw.weight is None or tuple(lw.weight.shape) != (N, K):
            got = None if lw.weight is None else list(lw.weight.shape)
            raise CheckpointError(f"{name}: bf16 Linear needs weight [{N}, {K}], got {got}")
    if lw.bias is not None and tuple(lw.bias.shape) != (N,):
        raise CheckpointError(f"{name}: bias must have shape [{N}], got {list(lw.bias.shape)}")


def validate_model(model: QuantizedModel, *, strict_fused: bool = True) -> list[str]:
    """Validate every Linear and check that fused groups (q/k/v, gate/up) share their weight global
    scale. Returns warnings (fused-group problems when ``strict_fused`` is False)."""
    for name, lw in model.linears.items():
        validate_linear(name, lw)
        for t in ("weight", "bias"):
            if f"{name}.{t}" in model.tensors and (t == "weight" or lw.bias is not None):
                raise CheckpointError(f"{name}.{t} is given both as a Linear record and in tensors")
    nvfp4_scales = {n: lw.nvfp4.global_decode_scale for n, lw in model.linears.items() if lw.format == "nvfp4"}
    fp8_scales = {n: lw.fp8_weight_scale for n, lw in model.linears.items() if lw.format == "fp8"}
    warnings = check_shared_global_scales(nvfp4_scales, strict=strict_fused)
    warnings += check_shared_global_scales(fp8_scales, strict=strict_fused)
    if model.kv_cache_format is not None and model.kv_cache_format not in KV_CACHE_FORMATS:
        raise CheckpointError(f"kv_cache_format must be None or one of {', '.join(KV_CACHE_FORMATS)}, "
                              f"got {model.kv_cache_format!r}")
    for attn, amaxes in model.kv_cache_amax.items():
        for what, v in zip(("k_amax", "v_amax"), amaxes):
            _check_amax(attn, what, v)
    return warnings


def dequantize_linear(lw: QuantizedLinearWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Linear's weight as a plain ``dtype`` tensor (NVFP4: ``e2m1 * (fp32(s_b) * g)``;
    FP8: ``fp32(w) * scale``), computed in float32 then cast."""
    if lw.format == "nvfp4":
        p = lw.nvfp4
        return dequantize_parts(p.packed, p.block_scale, p.global_decode_scale.reshape(()), dtype)
    if lw.format == "fp8":
        return (lw.fp8_weight.float() * lw.fp8_weight_scale.float().reshape(())).to(dtype)
    return lw.weight.to(dtype)


def dequantized_state_dict(model: QuantizedModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A plain HF state dict: every Linear dequantized to ``dtype``; other tensors as stored, except
    floating tensors cast to ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.tensors.items():
        out[name] = t.to(dtype) if t.dtype.is_floating_point else t
    for name, lw in model.linears.items():
        out[f"{name}.weight"] = dequantize_linear(lw, dtype)
        if lw.bias is not None:
            out[f"{name}.bias"] = lw.bias.to(dtype)
    return out
