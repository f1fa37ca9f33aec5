"""Export a fake-quantized model as checkpoint records holding exactly what its forward computes with."""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from ...checkpoint.types import QuantizedModel
from ..records import config_dict, entry_order, other_tensors
from .prepare import fake_quant_modules


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
    tensors = other_tensors(model, mods, copy=True)
    config = config_dict(model) if config is None else {k: v for k, v in dict(config).items()
                                                          if k != "quantization_config"}
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in mods]
    kept_high = [n for n, m in mods.items() if m.format == "bf16"]
    exclude = sorted(set(plain) | set(kept_high) | set(extra_exclude))
    return QuantizedModel(linears=linears, tensors=tensors, config=config, exclude_modules=exclude,
                          source_dir=source_dir, order=entry_order(model, linears))


__all__ = ["export_quantized_model"]
