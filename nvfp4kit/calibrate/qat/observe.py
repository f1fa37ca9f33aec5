"""Static activation scales for QAT: the max observer over calibration batches in full precision."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ...losses import run_causal_lm
from ...policy import expert_family
from .prepare import fake_quant_modules


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
            run_causal_lm(model, batch)
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
            family.setdefault(expert_family(n), []).append(float(m.input_amax))
    for n, m in mods.items():
        if not m.has_input_amax():
            seen = family.get(expert_family(n))
            if seen:
                m.input_amax.fill_(max(seen))
    for m in mods.values():
        if len(m.group) > 1 and all(g.has_input_amax() for g in m.group):
            m.input_amax.fill_(max(float(g.input_amax) for g in m.group))
    return {n: float(m.input_amax) for n, m in mods.items()}


__all__ = ["calibrate_input_amax"]
