"""Values a checkpoint must not hold, tensor by tensor: what corrupt bytes (a bad copy, flipped bits)
leave behind while the file still parses.

* scales: NaN / infinite / negative / zero scales where they are used — the ``scales`` rule of
  :mod:`nvfp4kit.checkpoint.serving` (the one owner of what a valid scale is), read from the folder;
* every other value: NaN or infinite entries in a floating tensor (a norm weight, an embedding, a
  bias, a kept-in-bf16 Linear) or NaN codes of an FP8 weight (:func:`nonfinite_tensors`).

``nvfp4kit inspect`` lists these problems per tensor; ``nvfp4kit eval`` names them when a perplexity is
not finite; ``nvfp4kit convert`` warns about non-finite values it copies.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import CheckpointError
from .types import QuantizedModel

# float8_e4m3fn NaN: exponent and mantissa bits all set (0x7F / 0xFF)
_E4M3_NAN_BITS = 0x7F


def nonfinite_count(t: torch.Tensor) -> int:
    """How many entries of ``t`` are NaN or infinite (0 for integer tensors; FP8 E4M3 NaN codes counted
    without a float copy)."""
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & _E4M3_NAN_BITS) == _E4M3_NAN_BITS).sum())
    if t.dtype == torch.float8_e5m2:
        return int((~torch.isfinite(t.float())).sum())
    if not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """``"NAME: k of n values are NaN or infinite"`` for every tensor of ``named`` that has any."""
    out = []
    for name, t in named:
        if t is None or t.device.type == "meta":
            continue
        bad = nonfinite_count(t)
        if bad:
            out.append(f"{name}: {bad} of {t.numel()} values are NaN or infinite")
    return out


def model_tensors(qm: QuantizedModel) -> Iterable[tuple[str, torch.Tensor]]:
    """The stored values of a :class:`QuantizedModel` other than its NVFP4 codes and scales: plain
    tensors, FP8 weights, kept-in-high-precision weights and biases, by checkpoint name."""
    yield from qm.tensors.items()
    for name, lw in qm.linears.items():
        if lw.fp8_weight is not None:
            yield f"{name}.weight", lw.fp8_weight
        if lw.weight is not None:
            yield f"{name}.weight", lw.weight
        if lw.bias is not None:
            yield f"{name}.bias", lw.bias


def scale_problems(path) -> list[str]:
    """The serving checker's ``scales`` findings of the checkpoint folder ``path``, one line each."""
    from .serving import check_serving

    return [f"{f.where}: {f.message}" for f in check_serving(path) if f.rule == "scales"]


def checkpoint_problems(path, qm: QuantizedModel | None = None) -> list[str]:
    """Every value problem of the quantized checkpoint ``path``, per tensor: broken scales, then
    non-finite values (of ``qm``, the loaded checkpoint, when given; else it is loaded)."""
    problems = scale_problems(path)
    if qm is None:
        from .quantized import load_quantized

        try:
            qm = load_quantized(path)
        except CheckpointError as e:
            return problems + [str(e)]
    return problems + nonfinite_tensors(model_tensors(qm))


__all__ = ["checkpoint_problems", "model_tensors", "nonfinite_count", "nonfinite_tensors", "scale_problems"]
