"""QAT model surgery: replace a model's Linears by fake-quantized ones (formats per module, fused
groups sharing their scales, optionally starting from a PTQ checkpoint), change their formats, and
put plain Linears back."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn

from ...checkpoint.layout import dequantize_linear
from ...checkpoint.types import QuantizedLinearWeight, QuantizedModel
from ...formats.nvfp4 import BLOCK_1D, BLOCK_SIZE
from ...policy import DEFAULT_EXCLUDE, fused_groups, matches_any
from ..surgery import replace_module
from .linear import QAT_FORMATS, FakeQuantLinear


def linear_names(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Names of the ``nn.Linear`` modules (any subclass) not matching an ``exclude`` pattern."""
    exclude = tuple(exclude)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not matches_any(n, exclude)]


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
        missing = [n for n in ptq.linears if n not in names and not matches_any(n, exclude)]
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
        replace_module(model, name, fq)
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
    w = dequantize_linear(rec, torch.float32)
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
        replace_module(model, name, lin)
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


__all__ = ["fake_quant_modules", "linear_names", "prepare_qat", "set_formats", "strip_qat"]
