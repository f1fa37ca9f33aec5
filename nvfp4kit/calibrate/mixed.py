"""Mixed-precision search: which Linear gets NVFP4, FP8 or BF16 under an effective-bits budget.

Three steps:

1. **Bits accounting** (:func:`weight_bits`): exact integer bits of one weight matrix in a format.
   NVFP4 = 4 bits per element + one 8-bit E4M3 scale per 16 elements (4.5 bits/weight); FP8 = 8;
   BF16 = 16. The 32-bit per-tensor scales (NVFP4 ``weight_scale_2``, FP8 ``weight_scale``) are
   negligible and left out unless ``tensor_scale_bits=True``. The effective bits of a plan are the
   total bits of the searched Linears' weights divided by their element count (modules excluded
   from the search, such as ``lm_head``, are not counted).
2. **Sensitivity** (:func:`estimate_sensitivity`): the estimated increase of the mean next-token
   loss (nats per token) when one module (a fused group: q/k/v, gate/up) alone is stored in a
   format, measured on calibration batches. Two estimators:

   * ``"fisher"`` (default; one forward+backward per batch): a diagonal-Fisher second-order
     estimate in each module's *output* space, ``0.5 * sum_t sum_j g_tj^2 * e_tj^2 / tokens``,
     where ``g`` is the gradient of the summed next-token loss w.r.t. the module output and
     ``e = fq(x) @ fq(W)^T - x @ W^T`` the output error of the format (weights and, for W4A4,
     inputs quantized with the static calibrated amax, exactly as deployed).
   * ``"kl"`` (a forward per module, format and batch): the measured mean per-token
     ``KL(p_full || p_module_quantized)``.

   The full-precision candidate (``"bf16"``) is the reference and has sensitivity 0.
3. **Choice** (:func:`choose_formats`): a multiple-choice knapsack minimising the summed
   sensitivity subject to ``total bits <= budget * elements``, solved by dynamic programming over
   the extra bits above the all-cheapest assignment. Extra costs are rounded *up* to a unit (1 bit
   when the budget is small enough, otherwise ``slack / max_units``), so every solution it returns
   satisfies the exact budget; with unit 1 the solution is optimal. A final greedy pass spends any
   slack the rounding left on the best remaining upgrades.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import progress, scratch
from ..formats.nvfp4 import BLOCK_SIZE
from ..losses import causal_lm_logits, distillation_loss, next_token_loss
from ..policy import DEFAULT_EXCLUDE, fused_partition
from .qat import QAT_FORMATS, FakeQuantLinear, calibrate_input_amax, linear_names, prepare_qat
from .surgery import linear_shapes, restore_modules

DEFAULT_CANDIDATES = ("nvfp4", "fp8", "bf16")
# element bits and (per-block scale bits, block size) of each format
_ELEMENT_BITS = {"nvfp4": 4, "fp8": 8, "bf16": 16}
_BLOCK_SCALE = {"nvfp4": (8, BLOCK_SIZE)}
_TENSOR_SCALE_BITS = {"nvfp4": 32, "fp8": 32, "bf16": 0}


# ----------------------------------------------------------------------------- bits accounting


def weight_bits(fmt: str, shape: Sequence[int], tensor_scale_bits: bool = False) -> int:
    """Exact storage bits of an ``[N, K]`` weight in ``fmt`` (``"nvfp4"``, ``"fp8"``, ``"bf16"``)."""
    if fmt not in _ELEMENT_BITS:
        raise ValueError(f"weight_bits: format must be one of {tuple(_ELEMENT_BITS)}, got {fmt!r}")
    if len(shape) != 2:
        raise ValueError(f"weight_bits: expected a 2-dim weight shape, got {tuple(shape)}")
    n, k = int(shape[0]), int(shape[1])
    numel = n * k
    bits = numel * _ELEMENT_BITS[fmt]
    if fmt in _BLOCK_SCALE:
        scale_bits, block = _BLOCK_SCALE[fmt]
        if k % block:
            raise ValueError(f"weight_bits: {fmt} needs K % {block} == 0, got shape {(n, k)}")
        bits += n * (k // block) * scale_bits
    if tensor_scale_bits:
        bits += _TENSOR_SCALE_BITS[fmt]
    return bits


def effective_bits(formats: Mapping[str, str], shapes: Mapping[str, Sequence[int]],
                   tensor_scale_bits: bool = False) -> float:
    """Total weight bits of the modules in ``formats`` divided by their element count."""
    total = sum(weight_bits(f, shapes[n], tensor_scale_bits) for n, f in formats.items())
    numel = sum(int(shapes[n][0]) * int(shapes[n][1]) for n in formats)
    if numel == 0:
        raise ValueError("effective_bits: no modules")
    return total / numel


def budget_total_bits(bits_budget: float, numel: int) -> int:
    """The largest integer number of bits whose average over ``numel`` elements is <= the budget
    (computed with exact rationals, so a plan within it never exceeds the budget by rounding)."""
    if not math.isfinite(bits_budget) or bits_budget <= 0:
        raise ValueError(f"bits budget must be a positive number, got {bits_budget}")
    return math.floor(Fraction(bits_budget) * numel)


# ----------------------------------------------------------------------------- the knapsack


@dataclass(frozen=True)
class Option:
    """One candidate format of one item: its exact cost (bits) and its loss (sensitivity)."""

    format: str
    cost: int
    loss: float


def choose_formats(items: Mapping[str, Sequence[Option]], budget: int, max_units: int = 20000) -> dict[str, str]:
    """Pick one option per item minimising the summed loss with summed cost <= ``budget`` (bits).

    Exact (optimal) whenever the slack above the all-cheapest assignment is at most ``max_units``
    bits; otherwise extra costs are rounded up to units of ``ceil(slack / max_units)`` bits (the
    budget still holds exactly) and leftover slack is spent greedily. Ties prefer the cheaper option.
    """
    names = list(items)
    if not names:
        return {}
    opts: list[list[Option]] = []
    for n in names:
        o = list(items[n])
        if not o:
            raise ValueError(f"choose_formats: item {n!r} has no options")
        for op in o:
            if op.cost < 0 or not math.isfinite(op.loss):
                raise ValueError(f"choose_formats: item {n!r} option {op} needs a cost >= 0 and a finite loss")
        opts.append(o)
    base = [min(o, key=lambda op: (op.cost, op.loss)) for o in opts]
    base_cost = sum(op.cost for op in base)
    if base_cost > budget:
        raise ValueError(
            f"choose_formats: the budget ({budget} bits) is below the cheapest assignment ({base_cost} bits)"
        )
    slack = budget - base_cost
    unit = max(1, -(-slack // max_units))
    cap = slack // unit
    inf = float("inf")
    # dp[c] = min loss over the items so far with rounded extra cost <= c
    dp = np.zeros(cap + 1, dtype=np.float64)
    choice = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, o in enumerate(opts):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        # cheaper options first so that ties keep the cheaper one
        order = sorted(range(len(o)), key=lambda j: (o[j].cost, o[j].loss))
        for j in order:
            extra = o[j].cost - base[i].cost
            if extra < 0:
                continue
            u = -(-extra // unit)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[: cap + 1 - u] + o[j].loss
            better = cand < new
            new = np.where(better, cand, new)
            arg = np.where(better, j, arg)
        dp, choice[i] = new, arg
    # backtrack from the best reachable capacity
    c = int(np.argmin(dp))
    picked: list[int] = [0] * len(names)
    for i in range(len(names) - 1, -1, -1):
        j = int(choice[i, c])
        picked[i] = j
        extra = opts[i][j].cost - base[i].cost
        c -= -(-extra // unit)
    total = sum(opts[i][picked[i]].cost for i in range(len(names)))
    # greedy: spend the slack that rounding left, best loss reduction per extra bit first
    while True:
        best = None
        for i, o in enumerate(opts):
            cur = o[picked[i]]
            for j, op in enumerate(o):
                gain = cur.loss - op.loss
                extra = op.cost - cur.cost
                if gain <= 0 or total + extra > budget:
                    continue
                key = (gain / extra if extra > 0 else inf, gain)
                if best is None or key > best[0]:
                    best = (key, i, j, extra)
        if best is None:
            break
        _, i, j, extra = best
        picked[i] = j
        total += extra
    if total > budget:  # cannot happen: costs were rounded up
        raise AssertionError(f"choose_formats: plan of {total} bits exceeds the budget of {budget}")
    return {names[i]: opts[i][picked[i]].format for i in range(len(names))}


# ----------------------------------------------------------------------------- sensitivity


def _batches_list(batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = [b if b.ndim == 2 else b.unsqueeze(0) for b in batches]
    if not out:
        raise ValueError("mixed-precision search: no calibration batches")
    return out


def _output_error(m: FakeQuantLinear, x: torch.Tensor, fmt: str, ref: torch.Tensor) -> torch.Tensor:
    saved = m.format
    m.format = fmt
    try:
        w = m.quantized_weight_value()
        xq = m.quantized_input_value(x) if m.quantize_input else x
        y = F.linear(xq.float(), w.float())
    finally:
        m.format = saved
    return y - ref


def _fisher_sensitivity(model, mods: dict[str, FakeQuantLinear], batches, candidates) -> dict[str, dict[str, float]]:
    quantized = [f for f in candidates if f != "bf16"]
    acc = {n: {f: 0.0 for f in quantized} for n in mods}
    tokens = 0
    handles = []
    inputs: dict[str, torch.Tensor] = {}

    def make_hook(name, m):
        def fwd_hook(_mod, args, out):
            x = args[0].detach()
            inputs[name] = x

            def grad_hook(g):
                xi = inputs.pop(name)
                ref = F.linear(xi.float(), m.weight.detach().float())
                g2 = g.detach().float().square()
                for f in quantized:
                    e = _output_error(m, xi, f, ref)
                    acc[name][f] += 0.5 * float((g2 * e.square()).sum())
            if out.requires_grad:
                out.register_hook(grad_hook)
        return fwd_hook

    for name, m in mods.items():
        handles.append(m.register_forward_hook(make_hook(name, m)))
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        for m in mods.values():
            m.weight.requires_grad_(True)  # so every hooked output carries a gradient
        with progress.task("sensitivity (fisher)", total=len(batches)) as t:
            for ids in batches:
                loss = next_token_loss(causal_lm_logits(model, ids), ids, reduction="sum")
                loss.backward()
                tokens += ids.shape[0] * (ids.shape[1] - 1)
                inputs.clear()
                t.advance(1)
    finally:
        for h in handles:
            h.remove()
        for p, fl in zip(params, flags):
            p.requires_grad_(fl)
            p.grad = None
        model.train(was_training)
    out = {}
    for n in mods:
        out[n] = {f: acc[n][f] / max(tokens, 1) for f in quantized}
        if "bf16" in candidates:
            out[n]["bf16"] = 0.0
    return out


@torch.no_grad()
def _kl_sensitivity(model, mods: dict[str, FakeQuantLinear], groups, batches, candidates) -> dict[str, dict[str, float]]:
    quantized = [f for f in candidates if f != "bf16"]
    was_training = model.training
    model.eval()
    ref = [causal_lm_logits(model, ids).float() for ids in batches]
    out: dict[str, dict[str, float]] = {}
    try:
        with progress.task("sensitivity (kl)", total=len(groups) * len(quantized)) as t:
            for group in groups:
                vals = {}
                for f in quantized:
                    for n in group:
                        mods[n].format = f
                    kl = 0.0
                    for ids, r in zip(batches, ref):
                        kl += float(distillation_loss(causal_lm_logits(model, ids), r)) * ids.numel()
                    vals[f] = kl / sum(ids.numel() for ids in batches)
                    for n in group:
                        mods[n].format = "bf16"
                    t.advance(1)
                # a group's sensitivity is shared; spread it over members by weight size
                total_numel = sum(mods[n].weight.numel() for n in group)
                for n in group:
                    share = mods[n].weight.numel() / total_numel
                    out[n] = {f: vals[f] * share for f in quantized}
                    if "bf16" in candidates:
                        out[n]["bf16"] = 0.0
    finally:
        for m in mods.values():
            m.format = "bf16"
        model.train(was_training)
    return out


def estimate_sensitivity(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    method: str = "fisher",
    quantize_input: bool = True,
) -> dict[str, dict[str, float]]:
    """Sensitivity (estimated mean next-token loss increase, nats) of each Linear in each
    candidate format; see the module docstring. The model is left as it was."""
    _check_candidates(candidates)
    if method not in ("fisher", "kl"):
        raise ValueError(f"sensitivity method must be 'fisher' or 'kl', got {method!r}")
    batches = _batches_list(calib_batches)
    with _wrapped(model, exclude, quantize_input) as mods:
        if quantize_input:
            calibrate_input_amax(model, batches)
        if method == "fisher":
            return _fisher_sensitivity(model, mods, batches, candidates)
        return _kl_sensitivity(model, mods, fused_partition(mods), batches, candidates)


class _wrapped:
    """Wrap the searchable Linears in bf16 (pass-through) fake-quant modules; restore on exit."""

    def __init__(self, model, exclude, quantize_input):
        self.model, self.exclude, self.quantize_input = model, tuple(exclude), quantize_input

    def __enter__(self) -> dict[str, FakeQuantLinear]:
        names = linear_names(self.model, self.exclude)
        self.originals = {n: self.model.get_submodule(n) for n in names}
        if any(isinstance(m, FakeQuantLinear) for m in self.originals.values()):
            raise ValueError("mixed-precision search: run it on the plain model, not one prepared for QAT")
        self.mods = prepare_qat(self.model, "bf16", self.quantize_input, self.exclude)
        return self.mods

    def __exit__(self, *exc):
        restore_modules(self.model, {n: orig for n, orig in self.originals.items() if n in self.mods})
        return False


def _check_candidates(candidates) -> None:
    bad = [c for c in candidates if c not in QAT_FORMATS]
    if bad or not candidates:
        raise ValueError(f"candidate formats must be a non-empty subset of {QAT_FORMATS}, got {tuple(candidates)}")


# ----------------------------------------------------------------------------- the search


@dataclass
class MixedPrecisionPlan:
    """The chosen format per Linear, with what the choice was based on."""

    formats: dict[str, str]
    bits_budget: float
    effective_bits: float
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    method: str = "fisher"
    tensor_scale_bits: bool = False

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for f in self.formats.values():
            c[f] = c.get(f, 0) + 1
        return c

    def estimated_loss_increase(self) -> float:
        return sum(self.sensitivity.get(n, {}).get(f, 0.0) for n, f in self.formats.items())

    def table_rows(self) -> list[list]:
        rows = []
        for n, f in self.formats.items():
            s = self.sensitivity.get(n, {})
            rows.append([n, f"{self.shapes[n][0]}x{self.shapes[n][1]}", f,
                         *(f"{s[c]:.3g}" if c in s else "-" for c in DEFAULT_CANDIDATES)])
        return rows

    def to_dict(self) -> dict:
        return {
            "bits_budget": self.bits_budget,
            "effective_bits": self.effective_bits,
            "method": self.method,
            "tensor_scale_bits": self.tensor_scale_bits,
            "counts": self.counts(),
            "formats": self.formats,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "sensitivity": self.sensitivity,
        }

    def save(self, path) -> None:
        """Write the plan as JSON (atomically: a temporary file renamed into place)."""
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".plan-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            scratch.publish(tmp)  # mkstemp made it 0600
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "MixedPrecisionPlan":
        with open(path) as f:
            d = json.load(f)
        return cls(formats=dict(d["formats"]), bits_budget=float(d["bits_budget"]),
                   effective_bits=float(d["effective_bits"]), sensitivity=d.get("sensitivity", {}),
                   shapes={n: tuple(s) for n, s in d.get("shapes", {}).items()}, method=d.get("method", "fisher"),
                   tensor_scale_bits=bool(d.get("tensor_scale_bits", False)))


def report_plan(plan: MixedPrecisionPlan, title: str | None = None) -> None:
    """Show the chosen map (per-Linear format and sensitivities) and its bits through ``progress``."""
    progress.table(title or f"mixed precision under {plan.bits_budget:g} bits/weight",
                   ["module", "shape", "format", *(f"sens {c}" for c in DEFAULT_CANDIDATES)], plan.table_rows())
    counts = ", ".join(f"{v} {k}" for k, v in sorted(plan.counts().items()))
    progress.log(f"effective bits {plan.effective_bits:.4f} (budget {plan.bits_budget:g}); {counts}; "
                 f"estimated loss increase {plan.estimated_loss_increase():.4g} nats ({plan.method})")


def plan_from_sensitivity(
    sensitivity: Mapping[str, Mapping[str, float]],
    shapes: Mapping[str, Sequence[int]],
    bits_budget: float,
    groups: Sequence[Sequence[str]] | None = None,
    tensor_scale_bits: bool = False,
    method: str = "given",
    max_units: int = 20000,
) -> MixedPrecisionPlan:
    """Choose formats for modules with known sensitivities (fused ``groups`` take one format)."""
    names = list(sensitivity)
    groups = [tuple(g) for g in (groups if groups is not None else fused_partition(names))]
    covered = [n for g in groups for n in g]
    if sorted(covered) != sorted(names):
        raise ValueError("plan_from_sensitivity: groups must partition the modules exactly once")
    items = {}
    for g in groups:
        fmts = set.intersection(*(set(sensitivity[n]) for n in g))
        opts = []
        for f in sorted(fmts):
            if f == "nvfp4" and any(int(shapes[n][1]) % BLOCK_SIZE for n in g):
                continue
            opts.append(Option(f, sum(weight_bits(f, shapes[n], tensor_scale_bits) for n in g),
                               float(sum(sensitivity[n][f] for n in g))))
        if not opts:
            raise ValueError(f"plan_from_sensitivity: no candidate format fits {g}")
        items[g] = opts
    numel = sum(int(shapes[n][0]) * int(shapes[n][1]) for n in names)
    budget = budget_total_bits(bits_budget, numel)
    try:
        chosen = choose_formats(items, budget, max_units)
    except ValueError as e:
        cheapest = sum(min(o.cost for o in opts) for opts in items.values()) / numel
        raise ValueError(f"bits budget {bits_budget} is below the cheapest plan ({cheapest:.4f} bits/weight)") from e
    formats = {n: chosen[g] for g in groups for n in g}
    formats = {n: formats[n] for n in names}
    shapes_t = {n: (int(shapes[n][0]), int(shapes[n][1])) for n in names}
    return MixedPrecisionPlan(formats, bits_budget, effective_bits(formats, shapes_t, tensor_scale_bits),
                              {n: dict(sensitivity[n]) for n in names}, shapes_t, method, tensor_scale_bits)


def search_mixed_precision(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    bits_budget: float,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    method: str = "fisher",
    quantize_input: bool = True,
    tensor_scale_bits: bool = False,
    sensitivity: Mapping[str, Mapping[str, float]] | None = None,
) -> MixedPrecisionPlan:
    """Per-Linear format choice under ``bits_budget`` effective bits per weight.

    Args:
        model: an HF causal LM or the hybrid model (full precision); left unchanged.
        calib_batches: token id tensors ``[B, T]`` (or ``[T]``).
        bits_budget: e.g. 4.75; at least the all-cheapest plan (4.5 for NVFP4).
        candidates: formats to choose from.
        exclude: fnmatch patterns of Linears kept out of the search (and out of the bits count).
        method: ``"fisher"`` or ``"kl"`` (see :func:`estimate_sensitivity`).
        quantize_input: sensitivities of W4A4 / W8A8 (True) or weight-only (False) layers.
        sensitivity: reuse sensitivities computed before (skips the measurement), e.g. to try
            several budgets.

    Returns a :class:`MixedPrecisionPlan`; ``plan.formats`` maps module name -> format.
    """
    _check_candidates(candidates)
    batches = _batches_list(calib_batches) if sensitivity is None else None
    if sensitivity is None:
        sensitivity = estimate_sensitivity(model, batches, candidates, exclude, method, quantize_input)
    names = linear_names(model, exclude)
    missing = [n for n in names if n not in sensitivity]
    if missing:
        raise ValueError(f"search_mixed_precision: no sensitivity for {missing[:5]}")
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    sens = {n: {f: float(v) for f, v in sensitivity[n].items() if f in candidates} for n in names}
    return plan_from_sensitivity(sens, shapes, bits_budget, fused_partition(names), tensor_scale_bits, method)


def ptq_precision_plan(
    model: nn.Module,
    calib_samples,
    bits_budget: float,
    exclude: Iterable[str] = (),
    method: str = "fisher",
    max_samples: int = 8,
):
    """The ``quantize --scheme mixed --bits-budget B`` plan: the PTQ path's
    :class:`~nvfp4kit.policy.PrecisionPlan` with each searchable Linear's format
    chosen under the budget (W4A4 NVFP4, W8A8 FP8 or BF16), and the search record.

    ``calib_samples``: ``[n, L]`` token ids (the first ``max_samples`` rows are used). Modules the
    PTQ rules keep in high precision (``exclude``, default exclusions, K not a multiple of 16)
    stay out of the search and out of the bits count. Returns ``(PrecisionPlan, MixedPrecisionPlan)``.
    """
    from ..policy import LayerPlan, PrecisionPlan, plan_precision

    base = plan_precision(linear_shapes(model), "w4a4", tuple(exclude))
    fixed = [n for n, lp in base.layers.items() if lp.format == "bf16"]
    samples = calib_samples[:max_samples] if max_samples else calib_samples
    found = search_mixed_precision(model, samples, bits_budget, exclude=tuple(DEFAULT_EXCLUDE) + tuple(fixed),
                                   method=method)
    plan = PrecisionPlan(scheme="mixed")
    why = f"sensitivity search ({method}), {bits_budget:g} bits/weight"
    for n, lp in base.layers.items():
        if n in found.formats:
            f = found.formats[n]
            plan.layers[n] = LayerPlan(f, f != "bf16", why)
        else:
            plan.layers[n] = lp
    return plan, found


__all__ = [
    "DEFAULT_CANDIDATES",
    "MixedPrecisionPlan",
    "Option",
    "budget_total_bits",
    "choose_formats",
    "effective_bits",
    "estimate_sensitivity",
    "plan_from_sensitivity",
    "ptq_precision_plan",
    "report_plan",
    "search_mixed_precision",
    "weight_bits",
]
