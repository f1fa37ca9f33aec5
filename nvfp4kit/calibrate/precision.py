"""Which Linear gets which precision in PTQ, decided by module name, and the fused groups.

Schemes: ``w4a4`` (NVFP4 weights, NVFP4 activations with a static calibrated global scale),
``w4a16`` (NVFP4 weights only), ``fp8`` (per-tensor FP8 weights and static FP8 activations),
``mixed`` (a recipe preset decides per module).

Rules are data: an ordered list of ``(fnmatch pattern, format)``; the first match wins. User
``--exclude`` patterns come first (``bf16``), then the preset, then :data:`DEFAULT_EXCLUDE`, then
the scheme's default format. A Linear whose input size K is not a multiple of 16 stays in high
precision for NVFP4 (blocks of 16 run along K), with the reason recorded in its plan.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

SCHEMES = ("w4a4", "w4a16", "fp8", "mixed")

# Modules kept in high precision unless a rule says otherwise: output head, embeddings, MoE routers,
# Mamba conv1d, multi-token-prediction layers.
DEFAULT_EXCLUDE = (
    "lm_head",
    "*lm_head",
    "*embed*",
    "*router*",
    "*.gate",
    "*.mlp.gate",
    "*shared_expert_gate",
    "*conv1d*",
    "*mtp*",
)

# Nemotron 3 Super NVFP4 release: routed experts NVFP4, shared experts and Mamba in/out projections
# FP8, attention and latent projections BF16 (plus the default exclusions).
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "nemotron3-super": (
        ("*mtp*", "bf16"),
        ("*shared_expert*", "fp8"),
        ("*.experts.*", "nvfp4"),
        ("*latent_proj*", "bf16"),
        ("*latent*", "bf16"),
        ("*.q_proj", "bf16"),
        ("*.k_proj", "bf16"),
        ("*.v_proj", "bf16"),
        ("*.o_proj", "bf16"),
        ("*.mixer.in_proj", "fp8"),
        ("*.mixer.out_proj", "fp8"),
        ("*.in_proj", "fp8"),
        ("*.out_proj", "fp8"),
    ),
}

_SCHEME_FORMAT = {"w4a4": "nvfp4", "w4a16": "nvfp4", "fp8": "fp8"}

# members of a fused projection (they share one input and, in serving engines, one global scale)
FUSED_SETS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
    frozenset({"query", "key", "value"}),
)


@dataclass(frozen=True)
class LayerPlan:
    """One Linear's PTQ precision: ``format`` (nvfp4/fp8/bf16) and whether its input gets a static scale."""

    format: str
    quantize_input: bool
    reason: str = ""


@dataclass
class PrecisionPlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    scheme: str = "w4a4"
    recipe: str | None = None

    def quantized(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.format != "bf16"]

    def excluded(self) -> list[str]:
        return [n for n, p in self.layers.items() if p.format == "bf16"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.layers.values():
            out[p.format] = out.get(p.format, 0) + 1
        return out


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def plan_precision(linears: dict[str, tuple[int, int]], scheme: str = "w4a4", exclude=(), recipe: str | None = None,
                   default_exclude=DEFAULT_EXCLUDE) -> PrecisionPlan:
    """Resolve every Linear (name -> (out_features, in_features)) to a :class:`LayerPlan`."""
    if scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if recipe is not None and recipe not in PRESETS:
        raise ValueError(f"--recipe must be one of {', '.join(PRESETS)}, got {recipe!r}")
    if scheme == "mixed" and recipe is None:
        raise ValueError("--scheme mixed needs a --recipe preset (e.g. nemotron3-super)")
    rules: list[tuple[str, str, str]] = [(p, "bf16", "--exclude") for p in exclude]
    if recipe is not None:
        rules += [(p, f, recipe) for p, f in PRESETS[recipe]]
    rules += [(p, "bf16", "default exclusion") for p in default_exclude]
    default_fmt = "nvfp4" if scheme == "mixed" else _SCHEME_FORMAT[scheme]
    plan = PrecisionPlan(scheme=scheme, recipe=recipe)
    for name, (n_out, n_in) in linears.items():
        fmt, why = default_fmt, scheme
        for pattern, f, source in rules:
            if matches(name, pattern):
                fmt, why = f, f"{source} {pattern}"
                break
        if fmt == "nvfp4" and n_in % 16:
            fmt, why = "bf16", f"in_features {n_in} is not a multiple of 16"
        quant_in = fmt != "bf16" and not (fmt == "nvfp4" and scheme == "w4a16")
        plan.layers[name] = LayerPlan(fmt, quant_in, why)
    return plan


def fused_groups(names) -> list[list[str]]:
    """Groups of Linear names that are one fused projection (same parent, a known member set).

    Only complete-or-partial sets of at least two members form a group; order follows ``names``.
    """
    by_parent: dict[tuple[str, frozenset], list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        for s in FUSED_SETS:
            if leaf in s:
                by_parent.setdefault((parent, s), []).append(n)
                break
    return [g for g in by_parent.values() if len(g) >= 2]
