"""The Linear layer of low-precision training: an ``nn.Linear`` that computes in its own precision.

The Nemotron 3 model builds every projection as one of these (``nvfp4kit.model.linear.make_linear``).
Recipes switch a module's precision by its qualified name (the released checkpoint name, e.g.
``backbone.layers.3.mixer.in_proj``) with :func:`set_precision`; model blocks never branch on it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .precision import BF16, LinearPrecision, as_precision
from .qlinear import quantized_linear

# formats whose weight blocks run along the input dimension in groups of this many elements
_BLOCKED_FORMATS = {"nvfp4": 16, "mxfp8": 32}


def check_precision_fits(name: str, in_features: int, out_features: int, precision: LinearPrecision) -> None:
    """Raise a ValueError naming the module when its shape cannot be stored in ``precision``
    (NVFP4: both dims multiples of 16; MXFP8: of 32)."""
    block = _BLOCKED_FORMATS.get(precision.format)
    if block is None:
        return
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n % block:
            raise ValueError(
                f"{name or 'Linear'}: {what}={n} is not a multiple of {block}, required by "
                f"{precision.format} block scales (keep this module in bf16)"
            )


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose forward runs in ``self.precision`` (bf16 by default)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, precision=None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.precision = as_precision(precision)
        check_precision_fits("", in_features, out_features, self.precision)

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":  # nothing to initialise (and 40k+ modules in big presets)
            return
        super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.precision)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", precision={self.precision}"


def iter_linears(model: torch.nn.Module) -> Iterator[tuple[str, Linear]]:
    """Every model Linear with its qualified name, in module order."""
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            yield name, mod


def set_precision(model: torch.nn.Module, name_to_precision: dict) -> None:
    """Set the precision of the Linears named in ``name_to_precision`` (values: LinearPrecision or a
    format name). Unknown names and shapes a format cannot hold raise a ValueError naming the module;
    nothing is changed unless every entry is valid."""
    linears = dict(iter_linears(model))
    resolved = {}
    for name, p in name_to_precision.items():
        if name not in linears:
            close = [n for n in linears if n.endswith(name.split(".")[-1])][:3]
            hint = f" (e.g. {', '.join(close)})" if close else ""
            raise ValueError(f"set_precision: no Linear named {name!r} in the model{hint}")
        prec = as_precision(p)
        mod = linears[name]
        check_precision_fits(name, mod.in_features, mod.out_features, prec)
        resolved[name] = prec
    for name, prec in resolved.items():
        linears[name].precision = prec


def precision_map(model: torch.nn.Module) -> dict[str, LinearPrecision]:
    """The current precision of every Linear, by qualified name."""
    return {n: m.precision for n, m in iter_linears(model)}


__all__ = ["BF16", "Linear", "LinearPrecision", "check_precision_fits", "iter_linears", "precision_map",
           "set_precision"]
