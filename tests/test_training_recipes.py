"""Recipe presets resolved on the tiny hybrid model, and the rule machinery on a stand-in."""

from __future__ import annotations

import re

import pytest
import torch

from nvfp4kit import progress
from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.model.lm import build_model
from nvfp4kit.training.linear import Linear, iter_linears
from nvfp4kit.training.recipes import Recipe, Rule, apply_recipe, get_recipe, parse_flags, resolve_recipe


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


def _layer(name):
    m = re.match(r"^backbone\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _expected_nemotron3(name, n_layers, out_f, in_f):
    """The nemotron3 rules written out as plain ifs (independent of the rule table)."""
    tail = max(1, round(0.15 * n_layers))
    leaf = name.rsplit(".", 1)[-1]
    layer = _layer(name)
    if name == "lm_head" or leaf == "gate" or name.startswith("mtp."):
        return "bf16"
    if layer is not None and layer >= n_layers - tail:
        return "bf16"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "bf16"
    if leaf == "out_proj":
        return "mxfp8" if in_f % 32 == 0 and out_f % 32 == 0 else "bf16"
    if leaf.endswith("latent_proj"):
        return "bf16"
    return "nvfp4" if in_f % 16 == 0 and out_f % 16 == 0 else "bf16"


def test_nemotron3_on_tiny(tiny):
    n = tiny.config.num_hidden_layers
    resolved = resolve_recipe(tiny, "nemotron3")
    names = [nm for nm, _ in iter_linears(tiny)]
    assert [r.name for r in resolved] == names  # every Linear, once
    for r in resolved:
        exp = _expected_nemotron3(r.name, n, *r.shape)
        assert r.precision.format == exp, (r.name, r.precision, r.reason)
        if exp == "nvfp4":
            assert r.precision == LinearPrecision("nvfp4")
    fmts = {r.precision.format for r in resolved}
    assert fmts == {"bf16", "mxfp8", "nvfp4"}


def test_apply_sets_model_and_prints_every_linear(tiny, monkeypatch):
    tables = []
    monkeypatch.setattr(progress, "table", lambda title, cols, rows: tables.append((title, cols, rows)))
    resolved = apply_recipe(tiny, "all-nvfp4", flags=["no-rht", "no-sr"])
    try:
        by_name = dict(iter_linears(tiny))
        for r in resolved:
            assert by_name[r.name].precision == r.precision
        nv = [r for r in resolved if r.precision.format == "nvfp4"]
        assert nv and all(not r.precision.rht and not r.precision.stochastic_rounding and r.precision.weight_2d
                          for r in nv)
        assert dict(iter_linears(tiny))["lm_head"].precision.format == "bf16"
        assert len(tables[0][2]) == len(by_name)
        assert {row[0] for row in tables[0][2]} == set(by_name)
    finally:
        apply_recipe(tiny, "bf16", show=False)
    assert all(m.precision.format == "bf16" for _, m in iter_linears(tiny))


class StandIn(torch.nn.Module):
    """Layers named like the released checkpoint, 62 of them (the paper's 12B depth)."""

    def __init__(self, n_layers=62):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.layers = torch.nn.ModuleList()
        for _ in range(n_layers):
            blk = torch.nn.Module()
            blk.mixer = torch.nn.Module()
            blk.mixer.up_proj = Linear(32, 32)
            self.backbone.layers.append(blk)
        self.lm_head = Linear(16, 48)


@pytest.mark.parametrize("n_layers,first,last", [(62, 2, 8), (31, 1, 4), (8, 1, 1), (124, 4, 16)])
def test_paper_12b_scales_with_depth(n_layers, first, last):
    m = StandIn(n_layers)
    res = {r.name: r.precision.format for r in resolve_recipe(m, "paper-12b")}
    for i in range(n_layers):
        exp = "bf16" if i < first or i >= n_layers - last else "nvfp4"
        assert res[f"backbone.layers.{i}.mixer.up_proj"] == exp, i
    assert res["lm_head"] == "bf16"


def test_rules_first_match_wins_and_both_conditions():
    m = StandIn(10)
    r = Recipe("x", (Rule("mxfp8", r"up_proj$", layers=("first", 0.2)), Rule("fp8", r"up_proj$")), default="bf16")
    res = {x.name: x.precision.format for x in resolve_recipe(m, r)}
    assert [res[f"backbone.layers.{i}.mixer.up_proj"] for i in range(10)] == ["mxfp8"] * 2 + ["fp8"] * 8
    assert res["lm_head"] == "bf16"


def test_flags_and_errors():
    assert parse_flags(["no-2d", "no-rht", "no-sr", "4over6", "rht-size=32"]) == dict(
        weight_2d=False, rht=False, stochastic_rounding=False, four_over_six=True, rht_size=32)
    assert parse_flags(["rht-sign=" + "+-" * 8])["rht_sign"] == (1, -1) * 8
    assert get_recipe("nemotron3", ["no-sr"]).nvfp4.stochastic_rounding is False
    with pytest.raises(ValueError, match="unknown recipe flag"):
        parse_flags(["fast"])
    with pytest.raises(ValueError, match="unknown recipe 'foo'"):
        get_recipe("foo")
    with pytest.raises(ValueError, match="fraction"):
        Rule("bf16", layers=("middle", 0.5))
