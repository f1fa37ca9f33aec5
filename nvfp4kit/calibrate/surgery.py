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


def release_weights(model: nn.Module, names) -> None:
    """Put the parameters of the named modules on the meta device (their memory is freed; shapes stay).
    For a model whose weights stream from disk: a block's Linears once their records are made."""
    import torch

    for name in names:
        m = model.get_submodule(name)
        for k, p in m._parameters.items():
            if p is not None and p.device.type != "meta":
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every ``nn.Linear`` (any subclass), by name, in model order."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


__all__ = ["linear_shapes", "release_weights", "replace_module", "restore_modules"]
