"""The model's Linear factory: every projection is a :class:`~nvfp4kit.training.linear.Linear`, which
carries its own precision (bf16 unless a recipe or :func:`set_precision` says otherwise)."""

from __future__ import annotations

from ..training.linear import Linear, iter_linears, precision_map, set_precision


def make_linear(in_features: int, out_features: int, *, bias: bool = False, precision=None,
                device=None, dtype=None) -> Linear:
    """Build a model Linear (no bias by default), in ``precision`` (None: bf16 i.e. high precision)."""
    return Linear(in_features, out_features, bias=bias, precision=precision, device=device, dtype=dtype)


__all__ = ["Linear", "iter_linears", "make_linear", "precision_map", "set_precision"]
