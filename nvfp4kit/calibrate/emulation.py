"""Run a quantized model on any device by emulation: Linears that compute with quantized records.

Used by sequential calibration (blocks already quantized compute as they will be served), by
``nvfp4kit eval`` (checkpoints loaded into their architecture) and by the tests of exact export.

:class:`EmulatedLinear` holds the dequantized weight of a :class:`QuantizedLinearWeight` (exact:
E2M1 value x E4M3 block scale x FP32 global scale, or FP8 x scale) and, when the record has a
static ``input_amax`` (W4A4 / W8A8), quantizes its input at run time the way the hardware path
does: NVFP4 activations per 1x16 block along K with the calibrated global scale (values beyond the
calibrated amax saturate), FP8 activations per tensor with ``amax / 448``.

:func:`apply_kv_cache` emulates a static KV cache: in every attention with calibrated scales, the
keys (after the rotary embedding) and values are quantize-dequantized where they enter the cache,
through the hooks of :mod:`nvfp4kit.calibrate.kv_cache`, as the engines do with the checkpoint's
``k_scale`` / ``v_scale`` (:mod:`nvfp4kit.checkpoint.kv_cache`): FP8 E4M3 with the per-tensor decode
scale ``amax / 448`` (saturating, round-to-nearest-even), or NVFP4 along the head dim (1x16 blocks,
E4M3 block scales, the per-tensor second-level scale of the amax: ``amax / (6 * 448)``; values beyond
the calibrated amax saturate) with the format core's NVFP4 (``kernels.dispatch.fake_quantize``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.layout import dequantize_linear
from ..checkpoint.types import QuantizedLinearWeight, QuantizedModel
from ..formats.fp8 import fp8_fake_quant
from ..kernels.dispatch import fake_quantize
from .kv_cache import KVHookHandle, add_kv_hooks, check_kv_cache_format
from .surgery import replace_module


class EmulatedLinear(nn.Module):
    """A Linear computing with a quantized weight (and, with ``input_amax``, quantized activations)."""

    def __init__(self, q: QuantizedLinearWeight, dtype: torch.dtype = torch.float32, quantize_input: bool = True):
        super().__init__()
        self.format = q.format
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", dequantize_linear(q, dtype), persistent=False)
        self.register_buffer("bias", None if q.bias is None else q.bias.to(dtype), persistent=False)
        self.input_amax = q.input_amax if quantize_input else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_amax is not None:
            if self.format == "nvfp4":
                x = fake_quantize(x, self.input_amax, name="activation")
            elif self.format == "fp8":
                x = fp8_fake_quant(x, self.input_amax, name="activation")
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        act = "static" if self.input_amax is not None else "none"
        return f"{self.in_features}->{self.out_features}, format={self.format}, input quant={act}"


def apply_quantized(model: nn.Module, qmodel: QuantizedModel, dtype: torch.dtype = torch.float32,
                    quantize_inputs: bool = True) -> dict[str, nn.Module]:
    """Swap the Linears of ``model`` named in ``qmodel.linears`` for :class:`EmulatedLinear`; returns the
    replaced modules by name (to put back, e.g. after sequential calibration)."""
    modules = dict(model.named_modules())
    missing = [n for n in qmodel.linears if n not in modules]
    if missing:
        raise ValueError(f"quantized checkpoint names modules the model does not have: {', '.join(missing[:5])}")
    for name, q in qmodel.linears.items():
        old = modules[name]
        if isinstance(old, nn.Linear) and tuple(old.weight.shape) != tuple(q.shape):
            raise ValueError(f"{name}: quantized weight shape {tuple(q.shape)} != model's {tuple(old.weight.shape)}")
        replace_module(model, name, EmulatedLinear(q, dtype, quantize_inputs))
    return {name: modules[name] for name in qmodel.linears}


def kv_fake_quantizer(kv_format: str):
    """``fq(x, amax, name) -> x_hat``: the quantize-dequantize of cached keys or values of a KV-cache
    format (along the last dim, the head dim, for NVFP4)."""
    check_kv_cache_format(kv_format, "KV-cache format")
    if kv_format == "nvfp4":
        return lambda x, amax, name: fake_quantize(x, amax, name=name)
    return lambda x, amax, name: fp8_fake_quant(x, amax, name=name)


def apply_kv_cache(model: nn.Module, qmodel: QuantizedModel) -> KVHookHandle | None:
    """Quantize-dequantize the cached keys/values of ``model``'s attentions per ``qmodel``'s FP8 or
    NVFP4 KV-cache scales (until the returned handle is removed); ``None`` if the checkpoint has none."""
    if qmodel.kv_cache_format is None or not qmodel.kv_cache_amax:
        return None
    fq = kv_fake_quantizer(qmodel.kv_cache_format)
    amax = dict(qmodel.kv_cache_amax)

    def fake_quant_kv(name: str, key: torch.Tensor, value: torch.Tensor):
        k_amax, v_amax = amax[name]
        return fq(key, k_amax, f"{name} keys"), fq(value, v_amax, f"{name} values")

    return add_kv_hooks(model, fake_quant_kv, names=list(amax))
