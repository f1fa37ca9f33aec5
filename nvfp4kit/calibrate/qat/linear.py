"""The fake-quantized Linear of QAT, trained through a straight-through estimator.

:class:`FakeQuantLinear` replaces an ``nn.Linear`` (or any subclass, such as the hybrid model's
``Linear``) and computes ``y = fq_x(x) @ fq_w(W)^T + b`` where the fake-quantized operands are
*exactly* the values the format core produces: ``fq_w(W) == nvfp4kit.quantize(W, global_amax=...)
.dequantize()`` bit for bit, and the export (:mod:`nvfp4kit.calibrate.qat.export`) stores the very
parts that forward used, so an exported QAT model is bit-identical to what it trained with.

Scales (what is fixed and what is recomputed):

* **Weights** keep FP32 latent ("master") values that the optimizer updates; their E4M3 block
  scales are recomputed from the current weights on every forward with the PTQ weight-scale
  method ``weight_scale`` ("max", "mse" or "4over6", see :mod:`nvfp4kit.calibrate.weight_scales`),
  which is what quantizing the final weights for export does. The per-tensor global
  amax is, by default, recomputed too (``weight_amax="dynamic"``, the max over the fused group,
  e.g. q/k/v share one); ``weight_amax="fixed"`` freezes it at its initial (PTQ) value, and
  weights that grow past it saturate.
* **Activations** (W4A4, and FP8 W8A8) use a *static* per-tensor amax taken from calibration (a
  PTQ result's ``input_amax`` or the max observer of :mod:`nvfp4kit.calibrate.qat.observe`), fixed
  during training: it becomes the checkpoint's ``input_scale``. Block scales of activations are computed per block on the fly,
  as the serving kernels do. Values beyond the calibrated amax saturate.
* Scales are not learnable parameters: gradients reach only the latent weights (and biases).

Backward: straight-through. The gradient of a fake-quantized tensor is passed unchanged where the
value lies within the representable range (``|x| <= amax``) and zeroed where it saturated
("clipped STE"); with a dynamic amax nothing saturates and the estimator is the identity.

Formats per layer: ``"nvfp4"`` (E2M1 + E4M3 per 16 + FP32 per tensor), ``"fp8"`` (per-tensor E4M3,
:mod:`nvfp4kit.formats.fp8`, as the PTQ path and the evaluation emulation compute it) and
``"bf16"`` (pass-through: kept in the model's precision). ``quantize_input=False`` gives weight-only
W4A16 / W8A16.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint.types import QuantizedLinearWeight
from ...formats.fp8 import fp8_fake_quant, fp8_quantize
from ...formats.nvfp4 import BLOCK_1D, BLOCK_SIZE, NVFP4Parts, dequantize_parts
from ...formats.scales import tensor_amax
from ...kernels.dispatch import fake_quantize, quantize_parts
from ..weight_scales import mse_weight_parts

QAT_FORMATS = ("nvfp4", "fp8", "bf16")
WEIGHT_SCALES = ("max", "mse", "4over6")


class StraightThrough(torch.autograd.Function):
    """Returns the precomputed fake-quantized value exactly; the gradient passes straight through
    where ``|x| <= clip`` (everywhere when clip is None)."""

    @staticmethod
    def forward(ctx, x, x_q, clip):
        if clip is not None:
            ctx.save_for_backward(x.detach().abs() <= clip)
        ctx.clipped = clip is not None
        return x_q.detach()  # a fresh tensor object: autograd metadata never lands on a cached value

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            (mask,) = ctx.saved_tensors
            grad = grad * mask.to(grad.dtype)
        return grad, None, None


class FakeQuantLinear(nn.Module):
    """A Linear computing with fake-quantized weights (and inputs), trained through an STE.

    Args:
        linear: the module to wrap; its ``weight``/``bias`` Parameters are shared, not copied.
        format: ``"nvfp4"``, ``"fp8"`` or ``"bf16"`` (pass-through).
        quantize_input: True for W4A4 / W8A8 (needs a static input amax before training or
            export), False for weight-only W4A16 / W8A16.
        input_amax: calibrated activation amax (static), or None to calibrate later.
        weight_amax: ``"dynamic"`` (recomputed from the current weights) or ``"fixed"`` (frozen at
            the value when the module was built, or at ``fixed_weight_amax``).
        weight_block: NVFP4 weight block, ``(1, 16)`` (default, the checkpoint layout) or ``(16, 16)``.
        weight_scale: NVFP4 weight block-scale method, ``"max"``, ``"mse"`` or ``"4over6"``
            (``"mse"`` only with 1x16 blocks).
    """

    def __init__(
        self,
        linear: nn.Linear,
        format: str = "nvfp4",
        quantize_input: bool = True,
        input_amax: float | None = None,
        weight_amax: str = "dynamic",
        fixed_weight_amax: float | None = None,
        weight_block=BLOCK_1D,
        weight_scale: str = "max",
        backend: str = "auto",
        name: str = "",
    ):
        super().__init__()
        if format not in QAT_FORMATS:
            raise ValueError(f"{name or 'FakeQuantLinear'}: format must be one of {QAT_FORMATS}, got {format!r}")
        if weight_amax not in ("dynamic", "fixed"):
            raise ValueError(f"{name or 'FakeQuantLinear'}: weight_amax must be 'dynamic' or 'fixed', got {weight_amax!r}")
        if weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"{name or 'FakeQuantLinear'}: weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
        if weight_scale == "mse" and tuple(weight_block) != tuple(BLOCK_1D):
            raise ValueError(f"{name or 'FakeQuantLinear'}: weight_scale 'mse' works on 1x16 blocks only")
        if format == "nvfp4" and linear.in_features % BLOCK_SIZE:
            raise ValueError(
                f"{name or 'FakeQuantLinear'}: in_features={linear.in_features} is not a multiple of {BLOCK_SIZE}, "
                "required by NVFP4 (keep this module in bf16)"
            )
        self.name = name
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.format = format
        self.quantize_input = bool(quantize_input)
        self.weight_amax_mode = weight_amax
        self.weight_block = tuple(weight_block)
        self.weight_scale = weight_scale
        self.backend = backend
        self.observing = False
        amax0 = float(tensor_amax(self.weight)) if fixed_weight_amax is None else float(fixed_weight_amax)
        self.register_buffer("fixed_weight_amax", torch.tensor(amax0, dtype=torch.float32))
        self.register_buffer(
            "input_amax", torch.tensor(float("nan") if input_amax is None else float(input_amax), dtype=torch.float32)
        )
        # the fused group this module belongs to (itself alone by default); not a submodule
        object.__setattr__(self, "_group", (self,))
        object.__setattr__(self, "_input_cache", [None])  # shared by the fused group
        self._cache = None
        self._amax_cache = None

    # -------------------------------------------------------------- configuration

    def set_group(self, group: tuple["FakeQuantLinear", ...]) -> None:
        object.__setattr__(self, "_group", tuple(group))
        object.__setattr__(self, "_input_cache", group[0]._input_cache if group else [None])
        self._cache = None

    @property
    def group(self) -> tuple["FakeQuantLinear", ...]:
        return self._group

    def has_input_amax(self) -> bool:
        return bool(torch.isfinite(self.input_amax))

    def extra_repr(self) -> str:
        mode = "bf16" if self.format == "bf16" else (
            f"{self.format}, {'w+a' if self.quantize_input else 'weight-only'}, weight_amax={self.weight_amax_mode}"
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"

    # -------------------------------------------------------------- quantizers

    def weight_global_amax(self) -> torch.Tensor:
        """The weight amax the quantizer uses: fixed, or the max over the fused group's current weights."""
        if self.weight_amax_mode == "fixed":
            return self.fixed_weight_amax
        return torch.stack([m._own_weight_amax() for m in self._group]).amax()

    def _own_weight_amax(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._amax_cache is None or self._amax_cache[0] != key:
            self._amax_cache = (key, tensor_amax(self.weight))
        return self._amax_cache[1]

    def weight_parts(self) -> NVFP4Parts:
        """NVFP4 parts of the current weight, exactly as forward quantizes it."""
        amax = self.weight_global_amax()
        if self.weight_scale == "mse":
            return mse_weight_parts(self.weight.detach(), amax, name=f"{self.name}.weight")
        rule = "4over6" if self.weight_scale == "4over6" else "max"
        return quantize_parts(self.weight.detach(), self.weight_block, "nearest", None, amax, rule, self.backend,
                              f"{self.name}.weight")

    def quantized_weight_value(self) -> torch.Tensor:
        """The fake-quantized weight (no autograd), cached while the weights are unchanged."""
        amax = self.weight_global_amax()
        # the weights' identity and version (bumped by every in-place update) and the quantizer settings
        key = (tuple((m.weight.data_ptr(), m.weight._version) for m in self._group), float(amax),
               self.weight_block, self.weight_scale, self.weight.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, {})  # one value per format for the same weights
        values = self._cache[1]
        if self.format not in values:
            if self.format == "nvfp4":
                p = self.weight_parts()
                values["nvfp4"] = dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, self.weight.dtype)
            elif self.format == "fp8":
                values["fp8"] = fp8_fake_quant(self.weight.detach(), amax)
            else:
                values["bf16"] = self.weight.detach()
        return values[self.format]

    def quantized_input_value(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_input_amax():
            raise RuntimeError(
                f"{self.name or 'FakeQuantLinear'}: no calibrated input amax; run calibrate_input_amax(...) or "
                "initialise from a PTQ result (or use quantize_input=False for weight-only)"
            )
        # fused siblings (q/k/v, gate/up) read the same input tensor: quantize it once. The cache keeps a
        # weak reference to the input, so a hit means the very same, live, unmodified tensor object.
        amax = float(self.input_amax)
        cached = self._input_cache[0]
        if cached is not None and cached[0]() is x and cached[1] == (x._version, self.format, amax):
            return cached[2]
        if self.format == "nvfp4":
            value = fake_quantize(x, self.input_amax, BLOCK_1D, "max", self.backend, f"{self.name}.input")
        else:
            value = fp8_fake_quant(x, self.input_amax)
        self._input_cache[0] = (weakref.ref(x), (x._version, self.format, amax), value) if len(self._group) > 1 else None
        return value

    def clear_input_cache(self) -> None:
        self._input_cache[0] = None

    # -------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            amax = tensor_amax(x)
            cur = self.input_amax
            self.input_amax.copy_(amax if not bool(torch.isfinite(cur)) else torch.maximum(cur, amax))
            return F.linear(x, self.weight, self.bias)
        if self.format == "bf16":
            return F.linear(x, self.weight, self.bias)
        w_clip = self.fixed_weight_amax if self.weight_amax_mode == "fixed" else None
        w = StraightThrough.apply(self.weight, self.quantized_weight_value(), w_clip)
        if self.quantize_input:
            x = StraightThrough.apply(x, self.quantized_input_value(x), self.input_amax.to(x.device))
        return F.linear(x, w, self.bias)

    # -------------------------------------------------------------- export

    def to_record(self) -> QuantizedLinearWeight:
        """The checkpoint record of this layer, holding exactly what forward computes with."""
        shape = (self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias.detach().clone()
        in_amax = float(self.input_amax) if (self.quantize_input and self.has_input_amax()) else None
        if self.quantize_input and self.format != "bf16" and in_amax is None:
            raise ValueError(f"{self.name}: cannot export a W4A4/W8A8 layer without a calibrated input amax")
        if self.format == "nvfp4":
            return QuantizedLinearWeight("nvfp4", shape, nvfp4=self.weight_parts(), input_amax=in_amax, bias=bias)
        if self.format == "fp8":
            q, s_dec = fp8_quantize(self.weight.detach(), self.weight_global_amax())
            return QuantizedLinearWeight("fp8", shape, fp8_weight=q, fp8_weight_scale=s_dec, input_amax=in_amax,
                                         bias=bias)
        return QuantizedLinearWeight("bf16", shape, weight=self.weight.detach().clone(), bias=bias)


__all__ = ["FakeQuantLinear", "QAT_FORMATS", "StraightThrough", "WEIGHT_SCALES"]
