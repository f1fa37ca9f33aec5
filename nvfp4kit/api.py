"""The top-level entry points: ``nvfp4kit.quantize`` and friends."""

from __future__ import annotations

import torch

from .formats.nvfp4 import Block, Rounding, ScaleRule
from .formats.tensor import NVFP4Tensor
from .kernels.dispatch import Backend, quantize_parts


def quantize(
    x: torch.Tensor,
    block: Block = (1, 16),
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: ScaleRule = "max",
    backend: Backend = "auto",
    name: str = "input",
) -> NVFP4Tensor:
    """Quantize a floating tensor to NVFP4.

    Args:
        x: float32 / bfloat16 / float16 / float64 tensor whose last dim is a multiple of 16.
        block: ``(1, 16)`` (one scale per 16 elements along the last dim) or ``(16, 16)`` (one per
            16x16 tile of the last two dims, for weights: then ``quantize(W).t()`` equals
            ``quantize(W.t())`` exactly).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased; draws from ``generator``).
        global_amax: use this tensor amax (a calibrated or shared value) instead of ``x``'s own;
            values beyond it saturate.
        scale_rule: ``"max"`` (block max maps to 6) or ``"4over6"`` (Four Over Six).
        backend: ``"auto"``, ``"torch"`` (reference), ``"compiled"`` (fused CPU) or ``"triton"`` (CUDA).
        name: what to call ``x`` in error messages (e.g. the module or checkpoint tensor name).

    Returns:
        An :class:`NVFP4Tensor` with ``x``'s shape and dtype (float32 for float64 input); ``.packed``, ``.block_scale`` and
        ``.global_scale`` (decode direction, amax / 2688) hold the parts.
    """
    with torch.no_grad():
        parts = quantize_parts(x, tuple(block), rounding, generator, global_amax, scale_rule, backend, name)
    return NVFP4Tensor.from_parts(parts, dtype=x.dtype if x.dtype != torch.float64 else torch.float32)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain tensor of the values ``q`` represents."""
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"dequantize: expected an NVFP4Tensor, got {type(q).__name__}")
    return q.dequantize(dtype)
