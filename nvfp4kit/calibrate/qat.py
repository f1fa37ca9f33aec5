"""Quantization-aware training: fake-quantized Linear layers with a straight-through estimator.

:class:`FakeQuantLinear` replaces an ``nn.Linear`` (or any subclass, such as the hybrid model's
``Linear``) and computes ``y = fq_x(x) @ fq_w(W)^T + b`` where the fake-quantized operands are
*exactly* the values the format core produces: ``fq_w(W) == nvfp4kit.quantize(W, global_amax=...)
.dequantize()`` bit for bit, and :func:`export_quantized_model` stores the very parts that forward
used, so an exported QAT model is bit-identical to what it trained with.

Scales (what is fixed and what is recomputed):

* **Weights** keep FP32 latent ("master") values that the optimizer updates; their E4M3 block
  scales are recomputed from the current weights on every forward with the PTQ weight-scale
  method ``weight_scale`` ("max", "mse" or "4over6", see :mod:`nvfp4kit.calibrate.weight_scales`),
  which is what quantizing the final weights for export does. The per-tensor global
  amax is, by default, recomputed too (``weight_amax="dynamic"``, the max over the fused group,
  e.g. q/k/v share one); ``weight_amax="fixed"`` freezes it at its initial (PTQ) value, and
  weights that grow past it saturate.
* **Activations** (W4A4, and FP8 W8A8) use a *static* per-tensor amax taken from calibration (a
  PTQ result's ``input_amax`` or :func:`calibrate_input_amax`), fixed during training: it becomes
  the checkpoint's ``input_scale``. Block scales of activations are computed per block on the fly,
  as the serving kernels do. Values beyond the calibrated amax saturate.
* Scales are not learnable parameters: gradients reach only the latent weights (and biases).

Backward: straight-through. The gradient of a fake-quantized tensor is passed unchanged where the
value lies within the representable range (``|x| <= amax``) and zeroed where it saturated
("clipped STE"); with a dynamic amax nothing saturates and the estimator is the identity.

Formats per layer: ``"nvfp4"`` (E2M1 + E4M3 per 16 + FP32 per tensor), ``"fp8"`` (per-tensor E4M3
with decode scale ``s = amax / 448``: ``q = e4m3(x / s)``, ``x_hat = q * s``, as the PTQ path and
the evaluation emulation compute it) and
``"bf16"`` (pass-through: kept in the model's precision). ``quantize_input=False`` gives weight-only
W4A16 / W8A16.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import weakref
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.types import QuantizedLinearWeight, QuantizedModel
from ..formats.nvfp4 import BLOCK_1D, BLOCK_SIZE, NVFP4Parts, dequantize_parts
from ..formats.scales import e4m3_rtne
from ..kernels.dispatch import quantize_parts
from .precision import DEFAULT_EXCLUDE as PTQ_DEFAULT_EXCLUDE
from .weight_scales import fp8_scale_from_amax, mse_weight_parts

QAT_FORMATS = ("nvfp4", "fp8", "bf16")
# Sibling projections that serving engines fuse into one GEMM: they must share a format, and for
# NVFP4/FP8 one weight global scale (and, reading the same input, one input scale).
DEFAULT_FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("query", "key", "value"),
)
# the PTQ path's default exclusions (output head, embeddings, routers, conv1d, MTP)
DEFAULT_EXCLUDE = tuple(PTQ_DEFAULT_EXCLUDE)
WEIGHT_SCALES = ("max", "mse", "4over6")
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


# ----------------------------------------------------------------------------- per-tensor fake quant


def _amax_of(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    return t.detach().abs().amax().float()


def nvfp4_fake_quant(
    x: torch.Tensor,
    global_amax=None,
    block=BLOCK_1D,
    scale_rule: str = "max",
    backend: str = "auto",
    name: str = "input",
) -> torch.Tensor:
    """``quantize(x, ...)`` then dequantize, in ``x``'s dtype (no autograd)."""
    parts = quantize_parts(x.detach(), tuple(block), "nearest", None, global_amax, scale_rule, backend, name)
    return dequantize_parts(parts.packed, parts.block_scale, parts.global_decode_scale, x.dtype)


def fp8_quantize(x: torch.Tensor, amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: ``(float8_e4m3fn values, float32 0-dim decode scale amax/448)``; dequantize
    is ``values.float() * decode_scale``. Values beyond ``amax`` saturate at +-448."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fp8_quantize: tensor contains NaN or inf values")
    amax = _amax_of(x) if amax is None else torch.as_tensor(amax, dtype=torch.float32)
    s_dec = fp8_scale_from_amax(amax.cpu()).to(x.device)
    return e4m3_rtne(x.detach().float() / s_dec), s_dec


def fp8_fake_quant(x: torch.Tensor, amax=None) -> torch.Tensor:
    q, s_dec = fp8_quantize(x, amax)
    return (q.float() * s_dec).to(x.dtype)


class _STE(torch.autograd.Function):
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


# ----------------------------------------------------------------------------- the module


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
        amax0 = float(_amax_of(self.weight)) if fixed_weight_amax is None else float(fixed_weight_amax)
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
            self._amax_cache = (key, _amax_of(self.weight))
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
            value = nvfp4_fake_quant(x, self.input_amax, BLOCK_1D, "max", self.backend, f"{self.name}.input")
        else:
            value = fp8_fake_quant(x, self.input_amax)
        self._input_cache[0] = (weakref.ref(x), (x._version, self.format, amax), value) if len(self._group) > 1 else None
        return value

    def clear_input_cache(self) -> None:
        self._input_cache[0] = None

    # -------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            amax = _amax_of(x)
            cur = self.input_amax
            self.input_amax.copy_(amax if not bool(torch.isfinite(cur)) else torch.maximum(cur, amax))
            return F.linear(x, self.weight, self.bias)
        if self.format == "bf16":
            return F.linear(x, self.weight, self.bias)
        w_clip = self.fixed_weight_amax if self.weight_amax_mode == "fixed" else None
        w = _STE.apply(self.weight, self.quantized_weight_value(), w_clip)
        if self.quantize_input:
            x = _STE.apply(x, self.quantized_input_value(x), self.input_amax.to(x.device))
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


# ----------------------------------------------------------------------------- model surgery


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def fused_groups(names: Iterable[str], siblings=DEFAULT_FUSED_SIBLINGS) -> list[tuple[str, ...]]:
    """Partition module names into fused groups (e.g. one attention's q/k/v) and singletons,
    in first-appearance order. A group is formed only from the siblings present."""
    names = list(names)
    present = set(names)
    seen: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for n in names:
        if n in seen:
            continue
        parent, _, leaf = n.rpartition(".")
        group = (n,)
        for sib in siblings:
            if leaf in sib:
                members = tuple(f"{parent}.{s}" if parent else s for s in sib)
                found = tuple(m for m in members if m in present and m not in seen)
                if len(found) > 1:
                    group = found
                break
        seen.update(group)
        groups.append(group)
    return groups


def linear_names(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Names of the ``nn.Linear`` modules (any subclass) not matching an ``exclude`` pattern."""
    exclude = tuple(exclude)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _matches(n, exclude)]


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def prepare_qat(
    model: nn.Module,
    formats: str | Mapping[str, str] = "nvfp4",
    quantize_input: bool = True,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    ptq: QuantizedModel | None = None,
    weights_from_ptq: bool = False,
    weight_amax: str = "dynamic",
    weight_block=BLOCK_1D,
    weight_scale: str = "max",
    backend: str = "auto",
) -> dict[str, FakeQuantLinear]:
    """Replace the model's Linears by :class:`FakeQuantLinear` in place; returns them by name.

    ``formats``: one format for all, or a per-module map (a mixed-precision plan; modules it does
    not name stay as they are). ``ptq``: a PTQ result; each of its records gives the module's
    format and calibrated ``input_amax`` (and, with ``weights_from_ptq``, its dequantized weight
    as the starting latent weight). Modules matching ``exclude`` (default: lm_head, MTP) and
    NVFP4 modules whose ``in_features`` is not a multiple of 16 are left untouched.
    Fused siblings (q/k/v, gate/up) share one weight global amax.
    """
    exclude = tuple(exclude)
    names = linear_names(model, exclude)
    if ptq is not None:
        missing = [n for n in ptq.linears if n not in names and not _matches(n, exclude)]
        if missing:
            raise ValueError(f"prepare_qat: the PTQ result names modules the model lacks: {missing[:5]}")
    created: dict[str, FakeQuantLinear] = {}
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, FakeQuantLinear):
            continue
        in_amax = None
        if ptq is not None:
            rec = ptq.linears.get(name)
            if rec is None:
                continue
            fmt = rec.format
            in_amax = rec.input_amax
            if weights_from_ptq:
                _load_record_weight(lin, rec, name)
        elif isinstance(formats, str):
            fmt = formats
        else:
            if name not in formats:
                continue
            fmt = formats[name]
        if fmt == "nvfp4" and lin.in_features % BLOCK_SIZE:
            continue
        fq = FakeQuantLinear(lin, fmt, quantize_input, in_amax, weight_amax, None, weight_block, weight_scale,
                             backend, name)
        _set_submodule(model, name, fq)
        created[name] = fq
    for group in fused_groups(created):
        members = tuple(created[n] for n in group)
        if len({m.format for m in members}) > 1:
            raise ValueError(f"prepare_qat: fused modules {group} must share one format, got "
                             f"{[m.format for m in members]}")
        for m in members:
            m.set_group(members)
        if weight_amax == "fixed":
            shared = max(float(m.fixed_weight_amax) for m in members)
            for m in members:
                m.fixed_weight_amax.fill_(shared)
        if quantize_input and all(m.has_input_amax() for m in members):
            shared = max(float(m.input_amax) for m in members)
            for m in members:
                m.input_amax.fill_(shared)
    return created


def _load_record_weight(lin: nn.Linear, rec: QuantizedLinearWeight, name: str) -> None:
    if rec.format == "nvfp4":
        p = rec.nvfp4
        w = dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, torch.float32)
    elif rec.format == "fp8":
        w = rec.fp8_weight.float() * rec.fp8_weight_scale.float()
    else:
        w = rec.weight.float()
    if tuple(w.shape) != tuple(lin.weight.shape):
        raise ValueError(f"{name}: PTQ weight shape {tuple(w.shape)} != model weight {tuple(lin.weight.shape)}")
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))


def strip_qat(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Linear`` modules back (sharing the trained Parameters)."""
    for name, fq in fake_quant_modules(model).items():
        lin = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None, device="meta")
        lin.weight = fq.weight
        lin.bias = fq.bias
        _set_submodule(model, name, lin)
    return model


def set_formats(model: nn.Module, formats: Mapping[str, str]) -> None:
    """Change the format of existing fake-quant modules (e.g. to evaluate a mixed plan)."""
    mods = fake_quant_modules(model)
    for name, fmt in formats.items():
        if name not in mods:
            raise ValueError(f"set_formats: no fake-quant module named {name!r}")
        if fmt not in QAT_FORMATS:
            raise ValueError(f"set_formats: {name}: format must be one of {QAT_FORMATS}, got {fmt!r}")
        if fmt == "nvfp4" and mods[name].in_features % BLOCK_SIZE:
            raise ValueError(f"set_formats: {name}: in_features not a multiple of {BLOCK_SIZE}, cannot be nvfp4")
    for name, fmt in formats.items():
        mods[name].format = fmt


# ----------------------------------------------------------------------------- calibration


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of an HF causal LM or the hybrid model for ``input_ids`` ``[B, T]``."""
    return _logits(model(input_ids))


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, batches: Iterable[torch.Tensor], reset: bool = True) -> dict[str, float]:
    """Max observer: run ``batches`` (token id tensors) through the model in full precision and set
    each fake-quant module's static ``input_amax`` to the largest |input| seen (fused groups share
    the max; an MoE expert that received no token takes the max of the same projection of the
    layer's other experts). Returns the amax by module name (NaN where nothing was observed)."""
    mods = fake_quant_modules(model)
    if not mods:
        raise ValueError("calibrate_input_amax: the model has no FakeQuantLinear modules (call prepare_qat first)")
    was_training = model.training
    model.eval()
    try:
        for m in mods.values():
            if reset:
                m.input_amax.fill_(float("nan"))
            m.observing = True
        n = 0
        for batch in batches:
            model(batch)
            n += 1
        if n == 0:
            raise ValueError("calibrate_input_amax: no calibration batches")
    finally:
        for m in mods.values():
            m.observing = False
        model.train(was_training)
    # MoE experts that no calibration token was routed to take the largest amax of their siblings
    # (the same projection of the other experts of the layer)
    family: dict[str, list[float]] = {}
    for n, m in mods.items():
        if m.has_input_amax():
            family.setdefault(_EXPERT_INDEX.sub(".*.", n), []).append(float(m.input_amax))
    for n, m in mods.items():
        if not m.has_input_amax():
            seen = family.get(_EXPERT_INDEX.sub(".*.", n))
            if seen:
                m.input_amax.fill_(max(seen))
    for m in mods.values():
        if len(m.group) > 1 and all(g.has_input_amax() for g in m.group):
            m.input_amax.fill_(max(float(g.input_amax) for g in m.group))
    return {n: float(m.input_amax) for n, m in mods.items()}


# ----------------------------------------------------------------------------- losses


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t (float32)."""
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"next_token_loss: logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, ignore_index=ignore_index)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per token, averaged over tokens
    (those where ``mask`` is true, if given). Float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {tuple(student_logits.shape)} != teacher "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [..., tokens]
    if mask is not None:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1) * temperature**2
    return kl.mean() * temperature**2


@dataclass
class QATLoss:
    """The training objective: next-token loss (QAT), or KL to a frozen teacher (QAD) plus an
    optional ``ce_weight`` times the next-token loss."""

    distill: bool = False
    temperature: float = 1.0
    ce_weight: float = 0.0

    def __call__(self, student_logits, input_ids, teacher_logits=None) -> torch.Tensor:
        if not self.distill:
            return next_token_loss(student_logits, input_ids)
        if teacher_logits is None:
            raise ValueError("QATLoss: distillation needs the teacher's logits")
        loss = distillation_loss(student_logits, teacher_logits, self.temperature)
        if self.ce_weight:
            loss = loss + self.ce_weight * next_token_loss(student_logits, input_ids)
        return loss


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy of ``model`` (call before :func:`prepare_qat`)."""
    if fake_quant_modules(model):
        raise ValueError("frozen_teacher: the model already has fake-quant modules; copy it before prepare_qat")
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------- export


def export_quantized_model(
    model: nn.Module,
    config: dict | None = None,
    source_dir: str | None = None,
    extra_exclude: Iterable[str] = (),
) -> QuantizedModel:
    """Records of a fake-quantized model: each FakeQuantLinear's parts exactly as its forward uses
    them, every other tensor of the state dict by name (tied duplicates stored once), and the
    Linears left unquantized (plain ones, and bf16 ones of a mixed plan) listed in ``exclude_modules``."""
    mods = fake_quant_modules(model)
    if not mods:
        raise ValueError("export_quantized_model: the model has no FakeQuantLinear modules")
    linears = {name: m.to_record() for name, m in mods.items()}
    owned = set()
    for name in mods:
        owned.update({f"{name}.weight", f"{name}.bias", f"{name}.input_amax", f"{name}.fixed_weight_amax"})
    tensors: dict[str, torch.Tensor] = {}
    seen_ptrs: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in owned:
            continue
        ptr = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ptr is not None and ptr in seen_ptrs:
            continue  # a tied weight (e.g. lm_head sharing the embedding)
        if ptr is not None:
            seen_ptrs[ptr] = key
        tensors[key] = t.detach().clone()
    if config is None:
        cfg = getattr(model, "config", None)
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    config = {k: v for k, v in dict(config).items() if k != "quantization_config"}
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in mods]
    kept_high = [n for n, m in mods.items() if m.format == "bf16"]
    exclude = sorted(set(plain) | set(kept_high) | set(extra_exclude))
    return QuantizedModel(linears=linears, tensors=tensors, config=config, exclude_modules=exclude,
                          source_dir=source_dir)


__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_FUSED_SIBLINGS",
    "FakeQuantLinear",
    "QATLoss",
    "QAT_FORMATS",
    "WEIGHT_SCALES",
    "calibrate_input_amax",
    "distillation_loss",
    "export_quantized_model",
    "fake_quant_modules",
    "fp8_fake_quant",
    "fp8_quantize",
    "frozen_teacher",
    "fused_groups",
    "linear_names",
    "model_logits",
    "next_token_loss",
    "nvfp4_fake_quant",
    "prepare_qat",
    "set_formats",
    "strip_qat",
]
