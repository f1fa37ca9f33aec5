"""Scales of the two-level NVFP4 scheme and of the MX formats.

Two directions exist for the per-tensor FP32 scale, and mixing them up is the classic source of
garbage output, so they have distinct names everywhere in nvfp4kit:

* ``global_encode_scale`` (S_enc) multiplies data on the way *into* FP4: ``2688 / amax``.
  compressed-tensors stores this one (``weight_global_scale``).
* ``global_decode_scale`` (S_dec, "g") multiplies on the way *out*: ``amax / 2688`` in spirit,
  computed as ``1 / S_enc``. modelopt stores this one (``weight_scale_2``).

All arithmetic is float32 in the canonical order of Transformer Engine's kernels.
"""

from __future__ import annotations

import torch

from .e2m1 import E2M1_MAX

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
FP32_MAX = torch.finfo(torch.float32).max
# 6 * 448: the largest magnitude representable by an E2M1 value times an E4M3 scale.
NVFP4_RANGE = E2M1_MAX * E4M3_MAX  # 2688.0
# float32(1/6), as a kernel computes it once
_INV_E2M1_MAX = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(E2M1_MAX, dtype=torch.float32)

E8M0_BIAS = 127
E8M0_NAN = 255


def _as_fp32_tensor(x, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32, device=device)
    return t


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a float32 0-dim tensor on x's device (0 for an empty tensor); no autograd."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def global_encode_scale(amax, range_max: float = NVFP4_RANGE) -> torch.Tensor:
    """S_enc = min(range_max / amax, FLT_MAX); 1 where amax is 0 or inf. Float32, same shape as amax.

    ``range_max`` is 6*448 for NVFP4 (6*256 for Four Over Six's headroom variant).
    """
    amax = _as_fp32_tensor(amax)
    if torch.isnan(amax).any():
        raise ValueError("global_encode_scale: amax is NaN")
    s = torch.clamp(torch.tensor(range_max, dtype=torch.float32, device=amax.device) / amax, max=FP32_MAX)
    return torch.where((amax == 0) | (s == 0), torch.ones_like(s), s)


def global_decode_scale(amax, range_max: float = NVFP4_RANGE) -> torch.Tensor:
    """S_dec = 1 / S_enc, the per-tensor scale applied when dequantizing (amax / 2688)."""
    return decode_from_encode(global_encode_scale(amax, range_max))


def decode_from_encode(global_encode: torch.Tensor) -> torch.Tensor:
    """Convert an encode-direction global scale to the decode direction (float32 reciprocal)."""
    s = _as_fp32_tensor(global_encode)
    return torch.ones_like(s) / s


def encode_from_decode(global_decode: torch.Tensor) -> torch.Tensor:
    """Convert a decode-direction global scale to the encode direction (float32 reciprocal)."""
    s = _as_fp32_tensor(global_decode)
    return torch.ones_like(s) / s


def e4m3_rtne(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round-to-nearest-even, saturating at +-448 (never NaN for finite input)."""
    return torch.clamp(x.float(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_block_scale(block_amax: torch.Tensor, global_encode: torch.Tensor) -> torch.Tensor:
    """E4M3 block scale s_b = e4m3(min(block_amax * (S_enc * 1/6), FLT_MAX)), clamped to 448 first."""
    factor = global_encode.float() * _INV_E2M1_MAX.to(block_amax.device)
    return e4m3_rtne(torch.clamp(block_amax.float() * factor, max=FP32_MAX))


def nvfp4_block_encode_scale(block_scale: torch.Tensor, global_decode: torch.Tensor) -> torch.Tensor:
    """Per-block multiplier into the E2M1 grid: min(1 / (fp32(s_b) * S_dec), FLT_MAX)."""
    denom = block_scale.float() * global_decode.float()
    return torch.clamp(torch.ones_like(denom) / denom, max=FP32_MAX)


# ----------------------------------------------------------------------------- E8M0 (MX formats)


def e8m0_from_exponent(exp: torch.Tensor) -> torch.Tensor:
    """Unbiased integer exponent -> float8_e8m0fnu scale holding 2**exp (clamped to [-127, 127])."""
    biased = (exp.to(torch.int32) + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
    return biased.view(torch.float8_e8m0fnu)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or its uint8 bits) -> float32 2**(e-127); code 255 -> NaN."""
    bits = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale.to(torch.uint8)
    e = bits.to(torch.int32)
    # build the float32 directly from its exponent bits; e == 0 is 2**-127, a subnormal
    out = torch.where(
        e > 0,
        (e << 23).view(torch.float32),
        torch.full(e.shape, 2.0**-127, dtype=torch.float32, device=e.device),
    )
    return torch.where(e == E8M0_NAN, torch.full_like(out, float("nan")), out)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) of positive finite float32 values, read from the exponent bits."""
    x = x.float()
    bits = x.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    # subnormals: normalise through a multiply by 2**64 (exact)
    sub = exp == -127
    if bool(sub.any()):
        xs = (x * 2.0**64).view(torch.int32)
        exp = torch.where(sub, ((xs >> 23) & 0xFF) - 127 - 64, exp)
    return exp


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) of positive finite float32 values."""
    x = x.float()
    f = floor_log2(x)
    mantissa = x.view(torch.int32) & 0x7FFFFF
    # subnormal powers of two have a non-zero mantissa field: check them by reconstruction
    pow2 = torch.ldexp(torch.ones_like(x), f.float())
    is_pow2 = torch.where(f < -126, pow2 == x, mantissa == 0)
    return torch.where(is_pow2, f, f + 1)
