"""Module policy: which Linears are quantized, in which format, and which must share their scales.

The one owner of these rules, decided by module name alone (no model, no torch): in-memory PTQ,
block-by-block PTQ, the streaming weight-only conversion, QAT, the mixed-precision search and the
checkpoint checks all import them from here, so every path chooses the same modules.

* **Fused groups** (:data:`FUSED_SIBLINGS`): sibling Linears (same parent) that serving engines fuse
  into one GEMM (q/k/v, gate/up; Mixtral's w1/w3; BERT's query/key/value). Members share one format,
  one weight global scale and one input scale.
* **Default exclusions** (:data:`DEFAULT_EXCLUDE`): modules kept in high precision unless a rule says
  otherwise - the output head, embeddings, MoE routers and shared-expert gates, Mamba ``conv1d``,
  multi-token-prediction layers - as the released NVFP4 Nemotron 3 checkpoints keep them.
* **Experts** (:func:`is_expert`, :func:`expert_family`): members of an ``experts`` list, whose calls
  depend on the routing (they are calibrated on every token of their layer and keep per-rank amax in
  training).
* **Recipes** (:data:`RECIPES`): named precision presets for ``--scheme mixed``.
* **The plan** (:func:`plan_precision`): ordered rules, first match wins - user ``--exclude`` patterns
  (high precision), then the recipe, then the default exclusions, then the scheme's format. A Linear
  whose input size K is not a multiple of 16 stays in high precision for NVFP4 (blocks of 16 run
  along K), with the reason recorded.

Patterns are fnmatch patterns over module names (case-sensitive); ``re:REGEX`` patterns (as
compressed-tensors writes them) are regular expressions matched from the start of the name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

SCHEMES = ("w4a4", "w4a16", "fp8", "mixed")
SCHEME_FORMAT = {"w4a4": "nvfp4", "w4a16": "nvfp4", "fp8": "fp8"}
HIGH_PRECISION = "bf16"
NVFP4_BLOCK = 16

FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("query", "key", "value"),
)

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*lm_head",
    "*embed*",
    "*router*",
    "*.gate",
    "*shared_expert_gate",
    "*conv1d*",
    "*mtp*",
)

EXPERTS_LIST = "experts"
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")

# Nemotron 3 Super NVFP4 release: routed experts NVFP4, shared experts and Mamba in/out projections FP8,
# attention and latent projections BF16, MTP BF16 (plus the default exclusions).
RECIPES: dict[str, tuple[tuple[str, str], ...]] = {
    "nemotron3-super": (
        ("*mtp*", "bf16"),
        ("*shared_expert*", "fp8"),
        ("*.experts.*", "nvfp4"),
        ("*latent*", "bf16"),
        ("*.q_proj", "bf16"),
        ("*.k_proj", "bf16"),
        ("*.v_proj", "bf16"),
        ("*.o_proj", "bf16"),
        ("*.in_proj", "fp8"),
        ("*.out_proj", "fp8"),
    ),
}


# ----------------------------------------------------------------------------- names


def matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch, or ``re:REGEX``) matches the module ``name``."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names`` (almost always typos)."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, p) for n in names)]


def is_expert(name: str) -> bool:
    """A member of an ``experts`` list or a module inside one (``...experts.3``, ``...experts.3.up_proj``)."""
    return _EXPERT_INDEX.search(name + ".") is not None


def expert_family(name: str) -> str:
    """The name with the expert index replaced by ``*``: the same projection of every expert of a layer."""
    return _EXPERT_INDEX.sub(lambda m: f"{m.group(1)}experts.*.", name)


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def fused_groups(names: Iterable[str]) -> list[list[str]]:
    """Groups of names that are one fused projection (same parent, members of one sibling set), each
    with at least two members present, members in sibling order (q, k, v / gate, up), groups in the
    order their first name appears. A trailing ``.weight`` on a name is accepted and kept."""
    by_key: dict[tuple[str, int], dict[str, str]] = {}
    for full in names:
        parent, _, leaf = _module_of(full).rpartition(".")
        for gi, sibs in enumerate(FUSED_SIBLINGS):
            if leaf in sibs:
                by_key.setdefault((parent, gi), {})[leaf] = full
                break
    return [[members[leaf] for leaf in FUSED_SIBLINGS[gi] if leaf in members]
            for (_, gi), members in by_key.items() if len(members) >= 2]


def fused_partition(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Every name exactly once: in its fused group (see :func:`fused_groups`) or alone, in the order
    each group's first name appears."""
    names = list(names)
    group_of = {n: tuple(g) for g in fused_groups(names) for n in g}
    out, seen = [], set()
    for n in names:
        g = group_of.get(n, (n,))
        if g[0] not in seen:
            seen.add(g[0])
            out.append(g)
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LayerPlan:
    """One Linear's PTQ precision: ``format`` (nvfp4/fp8/bf16) and whether its input gets a static scale."""

    format: str
    quantize_input: bool
    reason: str = ""


@dataclass
class PrecisionPlan:
    """The precision of every Linear of a model, by name, with the rule that chose it."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    scheme: str = "w4a4"
    recipe: str | None = None

    def quantized(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.format != HIGH_PRECISION]

    def excluded(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.format == HIGH_PRECISION]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.layers.values():
            out[p.format] = out.get(p.format, 0) + 1
        return out


def check_scheme(scheme: str, recipe: str | None = None) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if scheme == "mixed" and recipe is None:
        raise ValueError("--scheme mixed needs a --recipe preset (e.g. nemotron3-super) or a --bits-budget")


def plan_precision(linears: Mapping[str, tuple[int, int]], scheme: str = "w4a4", exclude: Iterable[str] = (),
                   recipe: str | None = None, default_exclude: Iterable[str] = DEFAULT_EXCLUDE) -> PrecisionPlan:
    """Resolve every Linear (name -> ``(out_features, in_features)``) to a :class:`LayerPlan`.

    Raises ``ValueError`` for an unknown scheme or recipe, and for ``exclude`` patterns that match
    no Linear (a typo would otherwise quantize what the user meant to keep)."""
    check_scheme(scheme, recipe)
    exclude = list(exclude)
    unknown = unmatched_patterns(exclude, linears)
    if unknown:
        sample = ", ".join(list(linears)[:4]) + (", ..." if len(linears) > 4 else "")
        raise ValueError(f"--exclude pattern(s) {unknown} match no Linear of the model (names look like: {sample})")
    rules: list[tuple[str, str, str]] = [(p, HIGH_PRECISION, "--exclude") for p in exclude]
    if recipe is not None:
        rules += [(p, f, recipe) for p, f in RECIPES[recipe]]
    rules += [(p, HIGH_PRECISION, "default exclusion") for p in default_exclude]
    default_fmt = "nvfp4" if scheme == "mixed" else SCHEME_FORMAT[scheme]
    plan = PrecisionPlan(scheme=scheme, recipe=recipe)
    for name, (_, n_in) in linears.items():
        fmt, why = default_fmt, scheme
        for pattern, f, source in rules:
            if matches(name, pattern):
                fmt, why = f, f"{source} {pattern}"
                break
        if fmt == "nvfp4" and n_in % NVFP4_BLOCK:
            fmt, why = HIGH_PRECISION, f"in_features {n_in} is not a multiple of {NVFP4_BLOCK}"
        plan.layers[name] = LayerPlan(fmt, quantize_input(fmt, scheme), why)
    return plan


def quantize_input(fmt: str, scheme: str) -> bool:
    """Whether a Linear of format ``fmt`` under ``scheme`` gets a static input scale (W4A4, W8A8)."""
    return fmt != HIGH_PRECISION and not (fmt == "nvfp4" and scheme == "w4a16")


__all__ = [
    "DEFAULT_EXCLUDE",
    "EXPERTS_LIST",
    "FUSED_SIBLINGS",
    "HIGH_PRECISION",
    "LayerPlan",
    "PrecisionPlan",
    "RECIPES",
    "SCHEMES",
    "check_scheme",
    "expert_family",
    "fused_groups",
    "fused_partition",
    "is_expert",
    "matches",
    "matches_any",
    "plan_precision",
    "quantize_input",
    "unmatched_patterns",
]
