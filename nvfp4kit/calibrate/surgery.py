"""Model surgery: swap one named submodule for another. The one helper every module swap of PTQ,
QAT, the mixed-precision search and the emulation goes through."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``name`` of ``model``; returns the module that was there."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, module)
    return old


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules that :func:`replace_module` returned, by name."""
    for name, module in originals.items():
        replace_module(model, name, module)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every ``nn.Linear`` (any subclass), by name, in model order."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


__all__ = ["linear_shapes", "replace_module", "restore_modules"]
