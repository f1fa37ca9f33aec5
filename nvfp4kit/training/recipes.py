"""Low-precision training recipes: per-module precision rules by name pattern and layer position.

A recipe is data: an ordered list of :class:`Rule` (first match wins) and a default. Each rule names
a format (``"nvfp4"`` means the recipe's NVFP4 precision with its switches) and matches a module by
a regular expression on its qualified name and/or by its block's position in the backbone (the first
or last fraction of the layers, scaled to the model's depth: ``max(1, round(fraction * layers))``).
:func:`resolve_recipe` turns a recipe into ``{module name: LinearPrecision}`` once, with the reason for
each choice; :func:`apply_recipe` sets it on the model and prints the table.

Presets:

* ``nemotron3`` (Nemotron 3 Super, arXiv 2604.12374): NVFP4 everywhere except the last 15% of the
  layers (BF16), attention q/k/v/o (BF16), Mamba ``out_proj`` (MXFP8), latent projections (BF16),
  MTP (BF16); router, embeddings and ``lm_head`` high precision (norms are not Linears).
* ``paper-12b`` (arXiv 2509.25149): first 2 and last 8 of 62 blocks BF16, scaled to the depth.
* ``all-nvfp4``: every Linear NVFP4 except the output head and the router.
* ``bf16``: every Linear in high precision.

NVFP4 switches for ablations: ``no-2d``, ``no-rht``, ``no-sr``, ``4over6``, ``rht-size=N``,
``rht-sign=+-+-...`` (see :func:`parse_flags`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from .. import progress
from .precision import LinearPrecision
from .linear import check_precision_fits, iter_linears, set_precision

_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)(\.|$)")


@dataclass(frozen=True)
class Rule:
    """``format`` for modules whose name matches ``pattern`` (re.search) and whose backbone layer is
    within ``layers`` = ("first" | "last", fraction). A rule with both needs both to hold."""

    format: str
    pattern: str | None = None
    layers: tuple[str, float] | None = None
    reason: str = ""

    def __post_init__(self):
        if self.pattern is None and self.layers is None:
            raise ValueError("Rule: give a name pattern, a layer position, or both")
        if self.layers is not None:
            side, frac = self.layers
            if side not in ("first", "last") or not 0 < float(frac) <= 1:
                raise ValueError(f"Rule: layers must be ('first'|'last', fraction in (0, 1]), got {self.layers}")
        if self.pattern is not None:
            re.compile(self.pattern)

    def matches(self, name: str, layer: int | None, n_layers: int) -> bool:
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.layers is not None:
            if layer is None or n_layers == 0:
                return False
            side, frac = self.layers
            count = max(1, round(float(frac) * n_layers))
            return layer < count if side == "first" else layer >= n_layers - count
        return True


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    default: str = "nvfp4"
    nvfp4: LinearPrecision = field(default_factory=lambda: LinearPrecision("nvfp4"))
    description: str = ""

    def with_nvfp4(self, **switches) -> "Recipe":
        return replace(self, nvfp4=replace(self.nvfp4, **switches))


_HIGH_PRECISION = (
    Rule("bf16", r"^lm_head$", reason="output head: high precision"),
    Rule("bf16", r"(^|\.)gate$", reason="router: high precision"),
    Rule("bf16", r"(^|\.)embeddings$", reason="embeddings: high precision"),
)

RECIPES: dict[str, Recipe] = {
    "nemotron3": Recipe(
        "nemotron3",
        _HIGH_PRECISION + (
            Rule("bf16", r"^mtp\.", reason="MTP: BF16"),
            Rule("bf16", layers=("last", 0.15), reason="last 15% of layers: BF16"),
            Rule("bf16", r"\.(q_proj|k_proj|v_proj|o_proj)$", reason="attention projections: BF16"),
            Rule("mxfp8", r"\.mixer\.out_proj$", reason="Mamba out_proj: MXFP8"),
            Rule("bf16", r"latent_proj$", reason="latent projections: BF16"),
        ),
        description="Nemotron 3 Super: NVFP4 with BF16/MXFP8 sensitive layers",
    ),
    "paper-12b": Recipe(
        "paper-12b",
        _HIGH_PRECISION + (
            Rule("bf16", r"^mtp\.", reason="MTP (not in the 12B model): BF16"),
            Rule("bf16", layers=("first", 2 / 62), reason="first 2 of 62 blocks (scaled): BF16"),
            Rule("bf16", layers=("last", 8 / 62), reason="last 8 of 62 blocks (scaled): BF16"),
        ),
        description="NVFP4 pretraining paper 12B: first 2 / last 8 of 62 blocks BF16",
    ),
    "all-nvfp4": Recipe("all-nvfp4", _HIGH_PRECISION[:2], description="every Linear NVFP4 except head and router"),
    "bf16": Recipe("bf16", (), default="bf16", description="every Linear in high precision"),
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def parse_flags(flags) -> dict:
    """NVFP4 switch overrides from flags: ``no-2d``, ``no-rht``, ``no-sr``, ``4over6``, ``rht-size=N``,
    ``rht-sign=`` followed by ``+``/``-`` characters (or comma-separated +-1)."""
    out: dict = {}
    for raw in flags or ():
        f = raw.strip().lower()
        if f in ("no-2d", "no-rht", "no-sr", "2d", "rht", "sr"):
            key = {"2d": "weight_2d", "rht": "rht", "sr": "stochastic_rounding"}[f.removeprefix("no-")]
            out[key] = not f.startswith("no-")
        elif f in ("4over6", "no-4over6"):
            out["four_over_six"] = f == "4over6"
        elif f.startswith("rht-size="):
            try:
                out["rht_size"] = int(f.split("=", 1)[1])
            except ValueError:
                raise ValueError(f"recipe flag {raw!r}: rht-size needs an integer") from None
        elif f.startswith("rht-sign="):
            v = f.split("=", 1)[1]
            signs = [1 if c == "+" else -1 for c in v] if set(v) <= {"+", "-"} else [int(s) for s in v.split(",")]
            if any(s not in (1, -1) for s in signs):
                raise ValueError(f"recipe flag {raw!r}: sign entries must be + or -")
            out["rht_sign"] = tuple(signs)
        else:
            raise ValueError(
                f"unknown recipe flag {raw!r}; known: no-2d, no-rht, no-sr, 4over6, rht-size=N, rht-sign=+-..."
            )
    return out


def get_recipe(name: str, flags=()) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    switches = parse_flags(flags)
    if switches:
        recipe = recipe.with_nvfp4(**switches)
        recipe = replace(recipe, name=name + "[" + ",".join(flags) + "]")
    return recipe


def _num_layers(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if isinstance(n, int):
        return n
    idx = [int(m.group(1)) for name, _ in model.named_modules() if (m := _LAYER_RE.match(name))]
    return max(idx) + 1 if idx else 0


# the training GEMMs also reduce along out_features (dgrad), so both dims must hold whole blocks
_TRAINING_BLOCK = {"nvfp4": 16, "mxfp8": 32}


def _fits(name: str, in_features: int, out_features: int, prec: LinearPrecision) -> bool:
    try:
        check_precision_fits(name, in_features, out_features, prec)
    except ValueError:
        return False
    block = _TRAINING_BLOCK.get(prec.format, 1)
    return in_features % block == 0 and out_features % block == 0


@dataclass(frozen=True)
class Resolved:
    name: str
    shape: tuple[int, int]
    precision: LinearPrecision
    reason: str


def resolve_recipe(model: torch.nn.Module, recipe: Recipe | str) -> list[Resolved]:
    """The precision of every model Linear under ``recipe``, with the rule that chose it. A module
    whose shape the chosen format cannot hold (blocks of 16 / 32) stays BF16, and says so."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    n_layers = _num_layers(model)
    out = []
    for name, mod in iter_linears(model):
        m = _LAYER_RE.match(name)
        layer = int(m.group(1)) if m else None
        fmt, reason = recipe.default, "default"
        for rule in recipe.rules:
            if rule.matches(name, layer, n_layers):
                fmt, reason = rule.format, rule.reason or rule.pattern or str(rule.layers)
                break
        prec = recipe.nvfp4 if fmt == "nvfp4" else LinearPrecision(fmt)
        if not _fits(name, mod.in_features, mod.out_features, prec):
            prec, reason = LinearPrecision("bf16"), f"shape {mod.out_features}x{mod.in_features} does not fit {fmt}"
        out.append(Resolved(name, (mod.out_features, mod.in_features), prec, reason))
    return out


def print_resolved(resolved: list[Resolved], title: str) -> None:
    """Print every Linear's precision (one row each) and a count per precision."""
    rows = [[r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.precision), r.reason] for r in resolved]
    progress.table(title, ["module", "out x in", "precision", "rule"], rows)
    counts: dict[str, list[int]] = {}
    for r in resolved:
        c = counts.setdefault(str(r.precision), [0, 0])
        c[0] += 1
        c[1] += r.shape[0] * r.shape[1]
    total = sum(c[1] for c in counts.values()) or 1
    progress.table(
        f"{title}: summary", ["precision", "modules", "weights", "share of Linear weights"],
        [[k, v[0], v[1], f"{100 * v[1] / total:.1f}%"] for k, v in sorted(counts.items())],
    )


def apply_recipe(model: torch.nn.Module, recipe: Recipe | str, flags=(), show: bool = True) -> list[Resolved]:
    """Resolve ``recipe`` on ``model``, set every Linear's precision, print the table."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe, flags)
    elif flags:
        recipe = recipe.with_nvfp4(**parse_flags(flags))
    resolved = resolve_recipe(model, recipe)
    set_precision(model, {r.name: r.precision for r in resolved})
    if show:
        print_resolved(resolved, f"recipe {recipe.name}")
    return resolved
