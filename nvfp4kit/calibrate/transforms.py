"""Function-preserving transforms applied before quantization, and where they apply in a block.

Two kinds, both leaving a standard checkpoint (only weights change; a serving engine needs nothing):

* **Rotation** (:mod:`~nvfp4kit.calibrate.rotation`): a randomized block-Hadamard rotation of the
  residual stream folded into the embeddings, the norms and the Linears, and a per-head rotation of
  v/o (QuaRot/SpinQuant without learning). Applied to the whole model before calibration.
* **Smoothing** (:mod:`~nvfp4kit.calibrate.smoothing`): per-input-channel scales migrated between
  activations and weights, folded into the producer of each input. ``awq`` searches the migration
  strength per group by the group's NVFP4 output error on calibration tokens; ``smoothquant`` uses
  the closed form with alpha 0.5. Applied per block (:func:`smooth_block`), on the block's own
  calibration inputs, just before the block is calibrated: in memory and block by block from disk
  alike (:func:`~nvfp4kit.calibrate.blockwise.quantize_by_block`'s ``smoothing``).

Where smoothing applies in a pre-norm decoder block (:func:`smoothing_groups`): the input norm into
q/k/v, the post-attention norm into gate/up, v_proj into o_proj (per kv head under grouped-query
attention), up_proj into down_proj (the SwiGLU product is linear in up). A group is smoothed only
when every consumer is an NVFP4 Linear of the plan and its producer is foldable (an RMSNorm without an
offset, or a plain Linear); MoE blocks get their attention groups only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..policy import PrecisionPlan
from .smoothing import (
    awq_search,
    fold_into_linear,
    fold_into_norm,
    fold_into_v_proj,
    smoothquant_scales,
    tie_gqa_scales,
)

SMOOTHING_METHODS = ("none", "awq", "smoothquant")
# measured in bench/ptq.py: AWQ smoothing before GPTQ halves the W4A4 gap of SmolLM2 and costs 0.3 points on a
# model whose weights were AWQ-smoothed before (Qwen2.5-Coder-AWQ); the rotation hurts NVFP4 W4A4 on both, so
# it is opt-in (--method auto compares them per model)
DEFAULT_SMOOTH = "awq"
DEFAULT_ROTATE = False
NVFP4 = "nvfp4"
# calibration tokens per group the smoothing search scores candidates on (an even stride over all tokens)
SMOOTH_TOKENS = 512
SMOOTH_GRID = 20
SMOOTHQUANT_ALPHA = 0.5


@dataclass(frozen=True)
class Transforms:
    """The transforms of one quantize job: ``rotate`` (the Hadamard rotation, with ``seed``) and
    ``smooth`` (one of :data:`SMOOTHING_METHODS`)."""

    rotate: bool = DEFAULT_ROTATE
    smooth: str = DEFAULT_SMOOTH
    seed: int = 0
    smooth_tokens: int = SMOOTH_TOKENS
    grid: int = SMOOTH_GRID

    def __post_init__(self):
        check_smoothing(self.smooth)

    @property
    def active(self) -> bool:
        return self.rotate or self.smooth != "none"

    def describe(self) -> str:
        parts = (["hadamard rotation"] if self.rotate else []) + ([f"{self.smooth} smoothing"]
                                                                 if self.smooth != "none" else [])
        return " + ".join(parts) or "none"


def check_smoothing(method: str) -> None:
    if method not in SMOOTHING_METHODS:
        raise ValueError(f"--smooth must be one of {', '.join(SMOOTHING_METHODS)}, got {method!r}")


# ----------------------------------------------------------------------------- groups


@dataclass
class SmoothGroup:
    """One input shared by ``consumers`` (names relative to the block), produced by ``producer``:
    ``kind`` is ``"norm"``, ``"linear"`` or ``"v"`` (v_proj into o_proj, ``heads = (H, KV)``)."""

    producer: str
    kind: str
    consumers: list[str]
    heads: tuple[int, int] | None = None


# (producer, kind, consumers) in a Llama-family pre-norm decoder block
_CANDIDATES = (
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", "v", ("self_attn.o_proj",)),
    ("mlp.up_proj", "linear", ("mlp.down_proj",)),
)


def _submodule(block: nn.Module, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def foldable_norm(module) -> bool:
    """An RMSNorm computing ``x / rms(x) * weight`` (not Gemma's ``* (1 + weight)``), without a bias."""
    cls = type(module).__name__
    return ("RMSNorm" in cls and "Gemma" not in cls and isinstance(getattr(module, "weight", None), torch.Tensor)
            and getattr(module, "bias", None) is None)


def _head_dim(block: nn.Module, attn) -> int | None:
    hd = getattr(attn, "head_dim", None)
    cfg = getattr(attn, "config", None)
    if hd is None and cfg is not None:
        hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads)
    return int(hd) if hd else None


def has_smoothing_groups(model: nn.Module) -> bool:
    """Whether any module of ``model`` has a group smoothing could scale (whatever the plan)."""
    return any(smoothing_groups(m, None) for m in model.modules() if hasattr(m, "input_layernorm")
               or hasattr(m, "post_attention_layernorm"))


def smoothing_groups(block: nn.Module, plan: PrecisionPlan | None, prefix: str = "") -> list[SmoothGroup]:
    """The groups of ``block`` (named ``prefix`` in the plan) that smoothing may scale (``plan`` None:
    by structure alone)."""
    groups = []
    for producer, kind, consumers in _CANDIDATES:
        p = _submodule(block, producer)
        cs = [_submodule(block, c) for c in consumers]
        if p is None or any(not isinstance(c, nn.Linear) for c in cs):
            continue
        full = [f"{prefix}.{c}" if prefix else c for c in consumers]
        if plan is not None and any(n not in plan.layers or plan.layers[n].format != NVFP4 for n in full):
            continue
        if kind == "norm" and not foldable_norm(p):
            continue
        heads = None
        if kind in ("linear", "v") and not isinstance(p, nn.Linear):
            continue
        if kind == "v":
            hd = _head_dim(block, _submodule(block, "self_attn"))
            o = cs[0]
            if not hd or o.in_features % hd or p.out_features % hd:
                continue
            heads = (o.in_features // hd, p.out_features // hd)
            if heads[0] % heads[1]:
                continue
        groups.append(SmoothGroup(producer, kind, list(consumers), heads))
    return groups


# ----------------------------------------------------------------------------- per block


@dataclass
class _Inputs:
    """What one group's input looked like over the calibration tokens: a strided sample and the
    per-channel amax of all of them."""

    stride: int
    limit: int
    rows: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0
    seen: int = 0
    amax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        a = x.abs().amax(0).float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        first = (-self.seen) % self.stride  # keep tokens seen, seen + stride, ... across calls
        take = x[first::self.stride][: max(0, self.limit - self.kept)]
        self.seen += x.shape[0]
        if take.numel():
            self.rows.append(take.float().cpu())
            self.kept += take.shape[0]


def _agreed(s: torch.Tensor) -> torch.Tensor:
    """Under data parallelism every rank folds rank 0's scales (each searched on its own slice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        s = s.contiguous().clone()
        dist.broadcast(s, 0)
    return s


def smooth_block(block: nn.Module, plan: PrecisionPlan, prefix: str, run, n_tokens: int, method: str,
                 tokens: int = SMOOTH_TOKENS, grid: int = SMOOTH_GRID) -> dict[str, float]:
    """Smooth ``block`` in place on its calibration inputs: ``run()`` runs the block over them once
    (hooks record every group's input), then each group's scales are chosen (``awq``: the grid
    search by NVFP4 output error, W4A4 when the plan quantizes the group's input; ``smoothquant``: alpha 0.5) and folded. The
    block computes the same function in full precision afterwards. ``n_tokens``: how many tokens
    ``run`` passes (the sample is an even stride of ``tokens`` of them). Returns each group's alpha
    by its first consumer's name."""
    check_smoothing(method)
    if method == "none":
        return {}
    groups = smoothing_groups(block, plan, prefix)
    if not groups:
        return {}
    stride = max(1, n_tokens // max(1, tokens))
    seen = {g.consumers[0]: _Inputs(stride, tokens) for g in groups}
    hooks = [block.get_submodule(name).register_forward_pre_hook(lambda m, a, rec=rec: rec.add(a[0]))
             for name, rec in seen.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for g in groups:
        rec = seen[g.consumers[0]]
        if not rec.rows:
            continue
        consumers = [block.get_submodule(c) for c in g.consumers]
        weights = [c.weight for c in consumers]
        x = torch.cat(rec.rows).to(weights[0].device)
        amax = rec.amax.to(weights[0].device)
        w4a4 = plan.layers[f"{prefix}.{g.consumers[0]}" if prefix else g.consumers[0]].quantize_input
        if method == "awq":
            found = awq_search(x, weights, w4a4, grid=grid, x_amax=amax if w4a4 else None, gqa=g.heads,
                               shared_weight_amax=len(weights) > 1)
            s, alpha = found.s, found.alpha
        else:
            s = smoothquant_scales(amax, weights, SMOOTHQUANT_ALPHA)
            if g.heads is not None:
                s = tie_gqa_scales(s, *g.heads)
            alpha = SMOOTHQUANT_ALPHA
        s = _agreed(s)
        if alpha == 0.0 and method == "awq":
            chosen[g.consumers[0]] = 0.0
            continue
        producer = block.get_submodule(g.producer)
        if g.kind == "norm":
            fold_into_norm(producer, consumers, s)
        elif g.kind == "v":
            fold_into_v_proj(producer, consumers[0], s, *g.heads)
        else:
            fold_into_linear(producer, consumers, s)
        chosen[g.consumers[0]] = float(alpha)
    return chosen


__all__ = [
    "DEFAULT_ROTATE",
    "DEFAULT_SMOOTH",
    "SMOOTHING_METHODS",
    "SmoothGroup",
    "Transforms",
    "check_smoothing",
    "foldable_norm",
    "has_smoothing_groups",
    "smooth_block",
    "smoothing_groups",
]
