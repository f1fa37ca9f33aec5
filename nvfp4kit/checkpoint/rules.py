"""Checkpoint checks of the module policy (:mod:`nvfp4kit.policy` owns the rules themselves).

* Exclusions are fnmatch patterns over module names (``lm_head``, ``model.layers.0.*``,
  ``*.mlp.gate``). A pattern that matches nothing is almost always a typo, so
  :func:`check_exclude_patterns` rejects it.
* Serving engines fuse some Linears into one GEMM (q/k/v, gate/up) and keep a single weight global
  scale for the fused weight (vLLM takes the max of the parts). :func:`check_shared_global_scales`
  verifies that a quantized model's fused groups (:func:`nvfp4kit.policy.fused_groups`) honour that.
* :func:`expand_regex_patterns` spells ``re:`` patterns out as module names, for formats whose
  readers only understand fnmatch.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..policy import fused_groups, matches, matches_any, unmatched_patterns
from .errors import CheckpointError


def is_excluded(module: str, patterns: Iterable[str]) -> bool:
    """True if the module name matches one of ``patterns`` (fnmatch, or ``re:REGEX``)."""
    return matches_any(module, patterns)


def expand_regex_patterns(patterns: Iterable[str], modules: Iterable[str]) -> list[str]:
    """Replace each ``re:`` pattern by the (sorted) module names it matches, for formats whose
    readers only understand fnmatch patterns; other patterns are kept, duplicates dropped."""
    modules = sorted(set(modules))
    out: list[str] = []
    for p in patterns:
        for q in ([m for m in modules if matches(m, p)] if p.startswith("re:") else [p]):
            if q not in out:
                out.append(q)
    return out


def check_exclude_patterns(patterns: Iterable[str], modules: Iterable[str], *, what: str = "module") -> None:
    """Raise :class:`CheckpointError` naming every pattern that matches none of ``modules``."""
    modules = list(modules)
    unknown = unmatched_patterns(patterns, modules)
    if unknown:
        sample = ", ".join(modules[:5]) + (", ..." if len(modules) > 5 else "")
        raise CheckpointError(
            f"exclude pattern(s) {unknown} match no {what} of the checkpoint "
            f"(fnmatch against names like: {sample})"
        )


def check_shared_global_scales(global_scales: dict[str, torch.Tensor | float], *, strict: bool = True) -> list[str]:
    """Verify that fused groups share their weight global scale.

    ``global_scales``: module name -> weight global scale (either direction, as long as all use the
    same one). Returns one message per offending group; raises :class:`CheckpointError` with all of
    them if ``strict``.
    """
    problems = []
    for group in sorted(fused_groups(global_scales), key=lambda g: g[0]):
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
