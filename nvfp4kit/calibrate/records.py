"""From calibration statistics to checkpoint records: which statistics quantizing a set of Linears
needs, the quantization itself (fused groups sharing scales, exact activation amax, the weight-scale
method), and the tensors around the records (everything else of the model, its config).

The PTQ lifecycle (:mod:`nvfp4kit.calibrate.ptq`) and the block-by-block engine
(:mod:`nvfp4kit.calibrate.blockwise`) both quantize through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import progress
from ..checkpoint.layout import FP8_RANGE, NVFP4_ACT_RANGE, exact_input_amax
from ..checkpoint.types import QuantizedLinearWeight, QuantizedModel
from ..formats.fp8 import fp8_quantize
from ..formats.nvfp4 import check_finite_values
from ..formats.scales import tensor_amax
from ..policy import PrecisionPlan, fused_groups
from .observers import LinearStats
from .sequential import block_layout
from .weight_scales import DEFAULT_WEIGHT_SCALE, gptq_factor, nvfp4_weight_parts


@dataclass(frozen=True)
class NeededStatistics:
    """Which Linears calibration observes (input amax), and which of them also need a Hessian."""

    observe: list[str]
    hessian_for: list[str]


def needed_statistics(plan: PrecisionPlan, names, weight_scale: str = DEFAULT_WEIGHT_SCALE) -> NeededStatistics:
    """The calibration statistics that quantizing ``names`` under ``plan`` needs (in ``names`` order)."""
    names = list(names)
    hessian_for = [n for n in names if plan.layers[n].format == "nvfp4"] if weight_scale == "gptq" else []
    wanted = {n for n in names if plan.layers[n].quantize_input} | set(hessian_for)
    return NeededStatistics([n for n in names if n in wanted], hessian_for)


def shared_amax(plan: PrecisionPlan, names: list[str], weight_amax: dict[str, torch.Tensor],
                input_amax: dict[str, float]) -> None:
    """Give each fused group one weight amax and one input amax per format (the max of its members), in place."""
    for group in fused_groups(names):
        for fmt in {plan.layers[n].format for n in group}:
            members = [n for n in group if plan.layers[n].format == fmt]
            wa = torch.stack([weight_amax[n] for n in members]).max()
            for n in members:
                weight_amax[n] = wa
            ia = [input_amax[n] for n in members if n in input_amax]
            if ia:
                for n in members:
                    if n in input_amax:
                        input_amax[n] = max(ia)


_FORMAT_NAMES = {"nvfp4": "NVFP4", "fp8": "FP8 E4M3"}


def check_weights(model: nn.Module, plan: PrecisionPlan, names, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first of the named Linears (of ``model``, named ``prefix`` in the
    plan) whose weight holds NaN or inf. The one check of every weight before calibration, smoothing or
    any weight-scale method reads it (a NaN would otherwise surface as some other tensor's NaN input or
    amax); weights still on the meta device are checked when their block is loaded."""
    modules = dict(model.named_modules())
    for n in names:
        w = modules[n].weight
        if w.device.type != "meta":
            full = f"{prefix}.{n}" if prefix else n
            check_finite_values(w.detach(), f"{full}.weight",
                                _FORMAT_NAMES.get(plan.layers[full].format, plan.layers[full].format))


def quantize_linears(model: nn.Module, plan: PrecisionPlan, stats: dict[str, LinearStats], names,
                     weight_scale: str = DEFAULT_WEIGHT_SCALE) -> dict[str, QuantizedLinearWeight]:
    """The records of the named Linears from their calibration statistics (see the module docs)."""
    names = list(names)
    modules = dict(model.named_modules())
    observe = needed_statistics(plan, names, weight_scale).observe
    weight_amax = {n: tensor_amax(modules[n].weight) for n in names}
    input_amax = {n: stats[n].input_amax for n in observe if n in stats}
    shared_amax(plan, names, weight_amax, input_amax)
    # an activation amax both checkpoint formats store and read back exactly, so the in-memory model and
    # the reloaded checkpoint quantize activations with the same encode scale
    for n in input_amax:
        act_range = NVFP4_ACT_RANGE if plan.layers[n].format == "nvfp4" else FP8_RANGE
        input_amax[n] = exact_input_amax(input_amax[n], act_range)

    records: dict[str, QuantizedLinearWeight] = {}
    factor_of: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # siblings share one Hessian
    with progress.task(f"quantizing ({weight_scale})", total=len(names)) as t:
        for n in names:
            lp = plan.layers[n]
            m = modules[n]
            w = m.weight.detach()
            bias = None if m.bias is None else m.bias.detach().float().clone()
            in_amax = input_amax.get(n) if lp.quantize_input else None
            if lp.format == "nvfp4":
                h = stats[n].hessian if (weight_scale == "gptq" and n in stats) else None
                if weight_scale == "gptq" and (h is None or stats[n].n_tokens == 0):
                    raise ValueError(f"{n}: no calibration input reached this Linear, so gptq has no Hessian")
                factor = None
                if h is not None:
                    if factor_of[0] is not h:
                        factor_of = (h, gptq_factor(h.to(w.device), dtype=torch.float64 if w.dtype == torch.float64
                                                    else torch.float32))
                    factor = factor_of[1]
                parts = nvfp4_weight_parts(w, weight_scale, global_amax=weight_amax[n], hessian=h, name=n,
                                           hessian_factor=factor)
                records[n] = QuantizedLinearWeight("nvfp4", tuple(w.shape), nvfp4=parts, input_amax=in_amax, bias=bias)
            elif lp.format == "fp8":
                q, s = fp8_quantize(w, weight_amax[n], name=n)
                records[n] = QuantizedLinearWeight("fp8", tuple(w.shape), fp8_weight=q, fp8_weight_scale=s,
                                                   input_amax=in_amax, bias=bias)
            else:
                raise ValueError(f"{n}: the plan keeps it in {lp.format}; only quantized Linears get records")
            t.advance(1)
    return records


def tied_duplicates(model: nn.Module) -> set[str]:
    """State names that repeat a parameter or buffer met earlier in the model (a head tied to the
    embedding): a checkpoint stores such a tensor once, under its first name. Works on meta models."""
    def names(remove: bool) -> set[str]:
        return ({n for n, _ in model.named_parameters(remove_duplicate=remove)}
                | {n for n, _ in model.named_buffers(remove_duplicate=remove)})

    return names(False) - names(True)


def other_tensors(model: nn.Module, quantized, copy: bool = False) -> dict[str, torch.Tensor]:
    """Every state tensor outside the ``quantized`` modules (by name); a tensor tied to an earlier one
    (a head sharing the embedding) is kept once. ``copy``: detached copies instead of views."""
    quantized = set(quantized)
    skip = tied_duplicates(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in quantized or name in skip:
            continue
        out[name] = t.detach().clone() if copy else t.detach()
    return out


def config_dict(model: nn.Module) -> dict:
    """The model's config as a plain dict (without any quantization_config)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    d = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)
    d.pop("quantization_config", None)
    return d


def state_entries(module: nn.Module, prefix: str, records: dict, skip: set[str]):
    """``("linear" | "tensor", full name, value)`` of a module in state-dict order: a quantized Linear's
    record at the place of its weight, every other tensor as it is (``skip``: tied duplicates)."""
    emitted = set()
    for key, t in module.state_dict().items():
        full = f"{prefix}.{key}" if prefix else key
        owner = full.rpartition(".")[0]
        if owner in records:
            if owner not in emitted:
                emitted.add(owner)
                yield "linear", owner, records[owner]
            continue
        if full in skip:
            continue
        yield "tensor", full, t.detach()


def kv_after(entries: list, kv_amax: dict[str, tuple[float, float]]):
    """``entries`` with each attention's KV entry right after the last entry under its name."""
    pending = dict(kv_amax)
    out = []
    for i, e in enumerate(entries):
        out.append(e)
        for attn in list(pending):
            nxt = entries[i + 1][1] if i + 1 < len(entries) else ""
            if e[1].startswith(attn + ".") and not nxt.startswith(attn + "."):
                out.append(("kv", attn, pending.pop(attn)))
    out += [("kv", a, v) for a, v in pending.items()]
    return out


def entry_order(model: nn.Module, records: dict, kv_amax: dict | None = None) -> list[tuple[str, str]]:
    """The order a checkpoint stores the entries of ``model`` in: the state dict's, a quantized Linear's
    record at its weight, each attention's KV scales after it, sorted by block unit (what is before
    the repeated blocks, each block, what is after), as the block-by-block engine writes them."""
    entries = kv_after(list(state_entries(model, "", records, tied_duplicates(model))), dict(kv_amax or {}))
    layout = block_layout(model)
    if layout is not None:
        entries.sort(key=lambda e: layout.unit_of(e[1])[0])
    return [(kind, name) for kind, name, _ in entries]


def quantized_model(model: nn.Module, plan: PrecisionPlan, records: dict[str, QuantizedLinearWeight],
                    kv_cache: str | None = None, kv_amax=None) -> QuantizedModel:
    """The :class:`QuantizedModel` of ``model`` with the quantized ``records`` (in plan order)."""
    quantized = plan.quantized()
    kv = dict(kv_amax or {})
    return QuantizedModel(
        linears={n: records[n] for n in quantized},
        tensors=other_tensors(model, records),
        config=config_dict(model),
        exclude_modules=sorted(plan.excluded()),
        kv_cache_format=kv_cache,
        kv_cache_amax=kv,
        order=entry_order(model, records, kv),
    )
