"""Which modules are quantized, and which must share a weight global scale.

* Exclusions are fnmatch patterns over module names (``lm_head``, ``model.layers.0.*``,
  ``*.mlp.gate``). A pattern that matches nothing is almost always a typo, so
  :func:`check_exclude_patterns` rejects it.
* Serving engines fuse some Linears into one GEMM (q/k/v, gate/up) and keep a single weight global
  scale for the fused weight (vLLM takes the max of the parts). Members of such a group must
  therefore be quantized with one shared global amax: :func:`shared_global_amax_groups` finds the
  groups, :func:`check_shared_global_scales` verifies a quantized model honours them.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from typing import Iterable

import torch

from .errors import CheckpointError

# Sibling Linears (same parent module) that engines fuse into one GEMM. Llama / Mistral / Qwen
# (``self_attn``, ``mlp``), Nemotron-H (``mixer``: q/k/v; its MLPs and experts have no gate), Mixtral
# experts (w1 / w3).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)

# Modules a weight-only conversion leaves in high precision unless told otherwise: embeddings, the
# output head, MoE routers (tiny, precision-critical).
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*embed*", "*.gate", "*router*")


def pattern_matches(pattern: str, name: str) -> bool:
    """fnmatch ``pattern`` against ``name`` (case-sensitive); ``re:REGEX`` patterns (as
    compressed-tensors writes them) are matched as regular expressions from the start."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def is_excluded(module: str, patterns: Iterable[str]) -> bool:
    """True if the module name matches one of ``patterns`` (see :func:`pattern_matches`)."""
    return any(pattern_matches(p, module) for p in patterns)


def expand_regex_patterns(patterns: Iterable[str], modules: Iterable[str]) -> list[str]:
    """Replace each ``re:`` pattern by the (sorted) module names it matches, for formats whose
    readers only understand fnmatch patterns; other patterns are kept, duplicates dropped."""
    modules = sorted(set(modules))
    out: list[str] = []
    for p in patterns:
        for q in ([m for m in modules if pattern_matches(p, m)] if p.startswith("re:") else [p]):
            if q not in out:
                out.append(q)
    return out


def check_exclude_patterns(patterns: Iterable[str], modules: Iterable[str], *, what: str = "module") -> None:
    """Raise :class:`CheckpointError` naming every pattern that matches none of ``modules``."""
    modules = list(modules)
    unknown = [p for p in patterns if not any(pattern_matches(p, m) for m in modules)]
    if unknown:
        sample = ", ".join(modules[:5]) + (", ..." if len(modules) > 5 else "")
        raise CheckpointError(
            f"exclude pattern(s) {unknown} match no {what} of the checkpoint "
            f"(fnmatch against names like: {sample})"
        )


def shared_global_amax_groups(names: Iterable[str]) -> list[list[str]]:
    """Groups of module names that must share one weight global scale.

    ``names`` are module names (``model.layers.0.self_attn.q_proj``); a trailing ``.weight`` is
    accepted and kept. Returns the groups with at least two members present, each in the order of
    :data:`FUSED_SIBLINGS` (q, k, v / gate, up), sorted by name of the first member. Modules not in
    any group are not listed.
    """
    by_parent: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for full in names:
        base = full[: -len(".weight")] if full.endswith(".weight") else full
        parent, _, leaf = base.rpartition(".")
        for gi, group in enumerate(FUSED_SIBLINGS):
            if leaf in group:
                by_parent[(parent, gi)][leaf] = full
    out = []
    for (parent, gi), members in by_parent.items():
        if len(members) >= 2:
            out.append([members[leaf] for leaf in FUSED_SIBLINGS[gi] if leaf in members])
    return sorted(out, key=lambda g: g[0])


def check_shared_global_scales(global_scales: dict[str, torch.Tensor | float], *, strict: bool = True) -> list[str]:
    """Verify that fused groups share their weight global scale.

    ``global_scales``: module name -> weight global scale (either direction, as long as all use the
    same one). Returns one message per offending group; raises :class:`CheckpointError` with all of
    them if ``strict``.
    """
    problems = []
    for group in shared_global_amax_groups(global_scales):
        values = [float(torch.as_tensor(global_scales[m]).reshape(-1)[0]) for m in group]
        if len(set(values)) > 1:
            listing = ", ".join(f"{m}={v:.9g}" for m, v in zip(group, values))
            problems.append(f"fused group does not share one weight global scale: {listing}")
    if problems and strict:
        raise CheckpointError(
            "; ".join(problems)
            + " (serving engines fuse these Linears and keep one scale; quantize each group with a shared global_amax)"
        )
    return problems
