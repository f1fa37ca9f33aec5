"""Post-training quantization of a model in memory: plan, calibrate, quantize.

Three steps, each a function of its own, composed by :func:`quantize_model`:

1. **Plan** (:func:`plan_model`): the module policy (:func:`nvfp4kit.policy.plan_precision`) over the
   model's Linears decides each one's format; fused MoE experts are first split into per-expert
   Linears (:func:`~nvfp4kit.calibrate.moe.unfuse_experts`). :func:`needed_statistics` says which
   Linears calibration must observe (:func:`~nvfp4kit.calibrate.records.needed_statistics`): the input amax of every Linear whose input gets a static scale,
   and the input Hessian of every NVFP4 Linear when the weight scale is ``gptq``.
2. **Calibrate** (:func:`calibrate_model`): run the calibration samples through the model with
   observers (:mod:`~nvfp4kit.calibrate.observers`; every MoE expert sees every token of its layer) and,
   with ``kv_cache="fp8"`` or ``"nvfp4"``, the post-RoPE key/value amax of every attention
   (:mod:`~nvfp4kit.calibrate.kv_cache`).
3. **Quantize** (:func:`~nvfp4kit.calibrate.records.quantize_linears`): fused groups (q/k/v, gate/up) share one weight global amax
   and one input amax per format; each static input amax is moved (by at most ~1 ulp) to a value both
   checkpoint formats store exactly (:func:`~nvfp4kit.checkpoint.layout.exact_input_amax`); each weight
   is quantized with the weight-scale method (:mod:`~nvfp4kit.calibrate.weight_scales`).

Calibration passes stop after the last repeated block when nothing after it is observed, so the
output head (most of the compute on a large-vocabulary model) never runs.

``sequential=True`` interleaves 2 and 3 block by block (:mod:`~nvfp4kit.calibrate.blockwise`): each
block is calibrated on the outputs of the blocks before it, already quantized and computing as they
will be served (:mod:`~nvfp4kit.calibrate.emulation`). The same engine quantizes models from disk.

The result is a :class:`QuantizeResult` whose ``qmodel`` (a
:class:`~nvfp4kit.checkpoint.types.QuantizedModel`) the checkpoint writers store. The model itself is
left numerically unchanged (with ``transforms``: its weights change, its full-precision function does not).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import progress
from ..checkpoint.types import QuantizedModel
from ..policy import PrecisionPlan, plan_precision
from .blockwise import quantize_by_block
from .kv_cache import check_kv_cache_format, observe_kv_cache
from .moe import unfuse_experts
from .observers import LinearStats, calibrate, stop_after_blocks
from .records import check_weights, needed_statistics, quantize_linears, quantized_model
from .rotation import rotate_model
from .surgery import linear_shapes
from .transforms import Transforms, has_smoothing_groups
from .weight_scales import DEFAULT_WEIGHT_SCALE, WEIGHT_SCALE_METHODS

DEFAULT_SCHEME = "w4a4"


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` returns: the records, the plan, the calibration statistics, the
    seconds each step took and how many calibration tokens were used."""

    qmodel: QuantizedModel
    plan: PrecisionPlan
    stats: dict[str, LinearStats] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    n_calib_tokens: int = 0


# ----------------------------------------------------------------------------- 1. plan


def check_weight_scale(weight_scale: str) -> None:
    if weight_scale not in WEIGHT_SCALE_METHODS:
        raise ValueError(f"--weight-scale must be one of {', '.join(WEIGHT_SCALE_METHODS)}, got {weight_scale!r}")


def plan_model(model: nn.Module, scheme: str = DEFAULT_SCHEME, exclude=(), recipe: str | None = None) -> PrecisionPlan:
    """The precision plan of ``model``'s Linears (fused MoE experts split first, in place)."""
    unfused = unfuse_experts(model)
    if unfused:
        progress.log(f"split {len(unfused)} fused expert modules into per-expert Linears")
    return plan_precision(linear_shapes(model), scheme, exclude, recipe)


def check_plan(model: nn.Module, plan: PrecisionPlan) -> list[str]:
    """The Linears ``plan`` quantizes; raises a clear error when the plan does not fit the model or
    leaves nothing to quantize."""
    shapes = linear_shapes(model)
    unknown = sorted(set(plan.layers) - set(shapes))
    if unknown:
        raise ValueError(f"the precision plan names modules the model lacks: {', '.join(unknown[:5])}")
    quantized = plan.quantized()
    if not quantized:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise ValueError(f"nothing to quantize: {type(model).__name__}'s projections are transformers Conv1D "
                             "layers (GPT-2 style), not nn.Linear; NVFP4 checkpoint formats and serving engines "
                             "define quantized Linears only")
        raise ValueError("nothing to quantize: every Linear is excluded (check --exclude / --recipe)"
                         if shapes else f"nothing to quantize: {type(model).__name__} has no nn.Linear layers")
    return quantized


# ----------------------------------------------------------------------------- 2. calibrate


def calibrate_model(model: nn.Module, samples: torch.Tensor, scheme: str = DEFAULT_SCHEME, exclude=(),
                    recipe: str | None = None, hessians: bool = True, batch_size: int = 1,
                    forward=None) -> dict[str, LinearStats]:
    """One calibration run serving every weight-scale method: the input amax of each quantized Linear
    and, with ``hessians``, the input Hessians of the NVFP4 ones (for gptq). Splits fused experts."""
    plan = plan_model(model, scheme, exclude, recipe)
    need = needed_statistics(plan, plan.quantized(), "gptq" if hessians else "max")
    with stop_after_blocks(model, plan.quantized()):
        return calibrate(model, plan.quantized(), samples, hessian_for=need.hessian_for, batch_size=batch_size,
                         forward=forward)


def _observing_kv(model: nn.Module, kv_cache: str | None):
    return observe_kv_cache(model, kv_cache) if kv_cache is not None else nullcontext({})


# ----------------------------------------------------------------------------- 3. quantize


# ----------------------------------------------------------------------------- all three


def quantize_model(
    model: nn.Module,
    samples: torch.Tensor | None = None,
    scheme: str = DEFAULT_SCHEME,
    weight_scale: str = DEFAULT_WEIGHT_SCALE,
    exclude=(),
    recipe: str | None = None,
    batch_size: int = 1,
    forward=None,
    stats: dict[str, LinearStats] | None = None,
    plan: PrecisionPlan | None = None,
    sequential: bool = False,
    kv_cache: str | None = None,
    transforms: Transforms | None = None,
) -> QuantizeResult:
    """Quantize ``model``'s Linears in memory (the model itself is left numerically unchanged).

    ``samples``: ``[n, L]`` calibration token ids; required when some input gets a static scale
    (w4a4, fp8, mixed) or ``weight_scale == "gptq"``. ``stats``: calibration statistics from an
    earlier :func:`calibrate_model` of this model (with Hessians for gptq), to quantize several ways
    from one calibration run; then ``samples`` is not needed. ``plan``: a precision plan resolved
    beforehand (e.g. by the mixed-precision search); it replaces ``scheme``/``exclude``/``recipe``.
    ``sequential``: calibrate block by block, each block seeing the inputs the already-quantized
    blocks before it produce; needs ``samples`` (with ``kv_cache``, each attention's KV amax is the
    maximum over the passes that reach it). ``kv_cache``: ``"fp8"`` / ``"nvfp4"`` to also calibrate static
    FP8 / NVFP4 KV-cache scales (the keys/values as cached, post-RoPE) during the calibration passes; needs
    ``samples`` (with ``stats`` given, the samples run once more for the KV cache alone).
    ``transforms``: function-preserving transforms (:mod:`~nvfp4kit.calibrate.transforms`) applied
    to ``model`` in place first: the rotation to the whole model, smoothing to each block on its
    calibration inputs (then the engine runs block by block, one-shot or sequential semantics as
    asked); the model then computes the same function in full precision with other weights.
    """
    check_kv_cache_format(kv_cache)
    check_weight_scale(weight_scale)
    transforms = transforms or Transforms(smooth="none")
    if transforms.active and stats is not None:
        raise ValueError("transforms change the weights the calibration statistics were taken on: "
                         "pass samples instead of stats")
    if transforms.rotate:
        info = rotate_model(model, seed=transforms.seed)
        progress.log(f"rotated the residual stream (block-Hadamard {info.hidden_block}, seed {info.seed})"
                     + (f" and each value head (block {info.head_block})" if info.heads else "")
                     + ("; the head is no longer tied to the embedding" if info.untied_head else ""))
    if plan is None:
        plan = plan_model(model, scheme, exclude, recipe)
    else:
        unfuse_experts(model)
    quantized = check_plan(model, plan)
    need = needed_statistics(plan, quantized, weight_scale)
    seconds: dict[str, float] = {}
    n_tokens = 0
    t0 = time.perf_counter()
    smooth = transforms.smooth if transforms.smooth != "none" and has_smoothing_groups(model) else "none"
    by_block = (sequential and need.observe) or smooth != "none"
    if by_block:  # (sequential with nothing to observe is one shot)
        if stats is not None or samples is None:
            what = "sequential quantization" if sequential else f"{transforms.smooth} smoothing"
            raise ValueError(f"{what} runs block by block on calibration samples: it needs samples, not stats")
        done = quantize_by_block(model, samples, plan, weight_scale, sequential=sequential and bool(need.observe),
                                 kv_cache=kv_cache, batch_size=batch_size, forward=forward,
                                 smooth=smooth)
        records, stats, kv_amax = done.records, done.stats, done.kv_amax
        seconds["calibrate+quantize"] = time.perf_counter() - t0
        n_tokens = int(samples.numel())
    else:
        check_weights(model, plan, quantized)  # (block by block, each block is checked when it starts)
        if stats is not None:
            lacking = [n for n in need.observe if n not in stats or (n in need.hessian_for and stats[n].hessian is None)]
            if lacking:
                raise ValueError(f"the given calibration statistics lack {', '.join(lacking[:5])}"
                                 + (" (or their Hessians)" if need.hessian_for else ""))
        kv_amax: dict = {}
        if (stats is None and need.observe) or kv_cache is not None:
            if samples is None:
                what = (f"scheme {plan.scheme!r} with weight scale {weight_scale!r}" if stats is None and need.observe
                        else f"--kv-cache {kv_cache}")
                raise ValueError(f"{what} needs calibration samples")
            with _observing_kv(model, kv_cache) as kv_amax, stop_after_blocks(model, need.observe):
                seen = calibrate(model, need.observe if stats is None else [], samples,
                                 hessian_for=need.hessian_for if stats is None else None, batch_size=batch_size,
                                 forward=forward)
            stats = seen if stats is None else stats
            seconds["calibrate"] = time.perf_counter() - t0
            n_tokens = int(samples.numel())
        stats = stats or {}
        t0 = time.perf_counter()
        records = quantize_linears(model, plan, stats, quantized, weight_scale)
        seconds["quantize"] = time.perf_counter() - t0
    qmodel = quantized_model(model, plan, records, kv_cache, kv_amax if kv_cache is not None else None)
    return QuantizeResult(qmodel, plan, stats, seconds, n_tokens)


__all__ = [
    "DEFAULT_SCHEME",
    "QuantizeResult",
    "calibrate_model",
    "check_plan",
    "check_weight_scale",
    "plan_model",
    "quantize_model",
]
