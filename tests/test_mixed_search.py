"""Mixed-precision search: bits accounting, the budgeted choice against brute force, sensitivities."""

import itertools
import json
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.calibrate.mixed import (
    MixedPrecisionPlan,
    Option,
    budget_total_bits,
    choose_formats,
    effective_bits,
    estimate_sensitivity,
    plan_from_sensitivity,
    search_mixed_precision,
    weight_bits,
)
from nvfp4kit.calibrate.qat import prepare_qat
from nvfp4kit.losses import distillation_loss



# ----------------------------------------------------------------------------- bits


@given(n=st.integers(1, 300), kb=st.integers(1, 64), scales=st.booleans())
def test_weight_bits_per_format(n, kb, scales):
    k = 16 * kb
    numel = n * k
    assert Fraction(weight_bits("nvfp4", (n, k)), numel) == Fraction(9, 2)  # 4 + 8/16
    assert weight_bits("fp8", (n, k)) == 8 * numel
    assert weight_bits("bf16", (n, k)) == 16 * numel
    extra = 32 if scales else 0
    assert weight_bits("nvfp4", (n, k), scales) == numel * 4 + (numel // 16) * 8 + extra
    assert weight_bits("fp8", (n, k), scales) == 8 * numel + extra
    assert weight_bits("bf16", (n, k), scales) == 16 * numel


def test_weight_bits_errors():
    with pytest.raises(ValueError, match="K % 16"):
        weight_bits("nvfp4", (4, 24))
    assert weight_bits("fp8", (4, 24)) == 8 * 96
    with pytest.raises(ValueError, match="format"):
        weight_bits("int4", (4, 16))


@given(budget=st.floats(1.0, 20.0), numel=st.integers(1, 10**9))
def test_budget_total_bits_is_the_exact_floor(budget, numel):
    b = budget_total_bits(budget, numel)
    assert Fraction(b, numel) <= Fraction(budget) < Fraction(b + 1, numel)
    assert b / numel <= budget


# ----------------------------------------------------------------------------- choice vs brute force


def _brute_force(items, budget):
    names = list(items)
    best = None
    for combo in itertools.product(*(items[n] for n in names)):
        cost = sum(o.cost for o in combo)
        if cost > budget:
            continue
        loss = sum(o.loss for o in combo)
        if best is None or loss < best:
            best = loss
    return best


option_lists = st.lists(
    st.tuples(st.integers(0, 60), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=3
)


@settings(max_examples=150)
@given(raw=st.lists(option_lists, min_size=1, max_size=6), frac=st.floats(0, 1.2))
def test_choice_is_optimal_against_brute_force(raw, frac):
    items = {f"m{i}": [Option(f"f{j}", c, l) for j, (c, l) in enumerate(opts)] for i, opts in enumerate(raw)}
    lo = sum(min(o.cost for o in v) for v in items.values())
    hi = sum(max(o.cost for o in v) for v in items.values())
    budget = lo + int(frac * (hi - lo))
    chosen = choose_formats(items, budget)
    picked = [next(o for o in items[n] if o.format == f) for n, f in chosen.items()]
    assert sum(o.cost for o in picked) <= budget
    assert sum(o.loss for o in picked) == pytest.approx(_brute_force(items, budget), abs=1e-9)


@settings(max_examples=100)
@given(raw=st.lists(option_lists, min_size=1, max_size=6), frac=st.floats(0, 1.2), units=st.integers(1, 7))
def test_coarse_units_still_respect_the_exact_budget(raw, frac, units):
    items = {f"m{i}": [Option(f"f{j}", c, l) for j, (c, l) in enumerate(opts)] for i, opts in enumerate(raw)}
    lo = sum(min(o.cost for o in v) for v in items.values())
    hi = sum(max(o.cost for o in v) for v in items.values())
    budget = lo + int(frac * (hi - lo))
    chosen = choose_formats(items, budget, max_units=units)
    picked = [next(o for o in items[n] if o.format == f) for n, f in chosen.items()]
    assert sum(o.cost for o in picked) <= budget
    assert sum(o.loss for o in picked) >= _brute_force(items, budget) - 1e-9


def test_choice_rejects_an_infeasible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        choose_formats({"a": [Option("x", 5, 0.0)], "b": [Option("y", 6, 1.0)]}, 10)


def test_plan_groups_and_budgets():
    shapes = {"l.q_proj": (64, 64), "l.k_proj": (32, 64), "l.v_proj": (32, 64), "l.o_proj": (64, 64),
              "l.down_proj": (64, 128)}
    sens = {"l.q_proj": {"nvfp4": 0.5, "fp8": 0.05, "bf16": 0.0},
            "l.k_proj": {"nvfp4": 0.5, "fp8": 0.05, "bf16": 0.0},
            "l.v_proj": {"nvfp4": 2.0, "fp8": 0.1, "bf16": 0.0},
            "l.o_proj": {"nvfp4": 1.0, "fp8": 0.1, "bf16": 0.0},
            "l.down_proj": {"nvfp4": 0.2, "fp8": 0.01, "bf16": 0.0}}
    all4 = plan_from_sensitivity(sens, shapes, 4.5)
    assert set(all4.formats.values()) == {"nvfp4"} and all4.effective_bits == 4.5
    all16 = plan_from_sensitivity(sens, shapes, 16)
    assert set(all16.formats.values()) == {"bf16"} and all16.effective_bits == 16
    for budget in (4.6, 5.0, 6.0, 7.5, 9.0, 12.0):
        plan = plan_from_sensitivity(sens, shapes, budget)
        assert plan.effective_bits <= budget
        assert len({plan.formats[f"l.{p}_proj"] for p in "qkv"}) == 1  # the fused group shares a format
        # optimality against brute force over group choices
        groups = [("l.q_proj", "l.k_proj", "l.v_proj"), ("l.o_proj",), ("l.down_proj",)]
        numel = sum(a * b for a, b in shapes.values())
        best = None
        for combo in itertools.product(("nvfp4", "fp8", "bf16"), repeat=3):
            fm = {n: f for g, f in zip(groups, combo) for n in g}
            if effective_bits(fm, shapes) <= budget:
                loss = sum(sens[n][fm[n]] for n in fm)
                best = loss if best is None else min(best, loss)
        assert plan.estimated_loss_increase() == pytest.approx(best)
        assert effective_bits(plan.formats, shapes) * numel <= budget * numel
    with pytest.raises(ValueError, match="below the cheapest"):
        plan_from_sensitivity(sens, shapes, 4.4)
    with pytest.raises(ValueError, match="below the cheapest"):  # the per-tensor scales push NVFP4 above 4.5
        plan_from_sensitivity(sens, shapes, 4.5, tensor_scale_bits=True)


def test_plan_save_load(tmp_path):
    shapes = {"a": (16, 32), "b": (16, 16)}
    sens = {"a": {"nvfp4": 1.0, "fp8": 0.1, "bf16": 0.0}, "b": {"nvfp4": 0.1, "fp8": 0.0, "bf16": 0.0}}
    plan = plan_from_sensitivity(sens, shapes, 6.0)
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    again = MixedPrecisionPlan.load(path)
    assert again.formats == plan.formats and again.effective_bits == plan.effective_bits
    assert json.loads(path.read_text())["counts"] == plan.counts()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]


# ----------------------------------------------------------------------------- sensitivity on a tiny LM


def _batches(n=2):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["fisher", "kl"])
def test_sensitivity_leaves_the_model_unchanged(tiny_llama, method):
    model = tiny_llama(init=0.1)
    before = {n: m for n, m in model.named_modules()}
    data = _batches()
    with torch.no_grad():
        ref = model(data[0]).logits
    sens = estimate_sensitivity(model, data, method=method)
    assert {n: m for n, m in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(data[0]).logits, ref)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(sens) == sorted(linears)
    for n, s in sens.items():
        assert s["bf16"] == 0.0 and s["nvfp4"] > 0 and s["fp8"] >= 0
    assert sum(s["fp8"] for s in sens.values()) < sum(s["nvfp4"] for s in sens.values()) / 4


def test_kl_sensitivity_is_the_measured_kl(tiny_llama):
    model = tiny_llama(init=0.1, seed=1)
    data = _batches(1)
    sens = estimate_sensitivity(model, data, candidates=("nvfp4", "bf16"), method="kl")
    name = "model.layers.1.self_attn.o_proj"  # a singleton group
    with torch.no_grad():
        ref = model(data[0]).logits
    mods = prepare_qat(model, "bf16")
    from nvfp4kit.calibrate.qat import calibrate_input_amax, set_formats

    calibrate_input_amax(model, data)
    set_formats(model, {name: "nvfp4"})
    with torch.no_grad():
        kl = float(distillation_loss(model(data[0]).logits, ref))
    assert sens[name]["nvfp4"] == pytest.approx(kl, rel=1e-6)
    assert mods[name].format == "nvfp4"


def test_search_end_to_end_respects_budget(tiny_llama):
    model = tiny_llama(init=0.1, seed=2)
    data = _batches(1)
    sens = estimate_sensitivity(model, data)
    for budget in (4.5, 4.75, 5.5, 8.0):
        plan = search_mixed_precision(model, None, budget, sensitivity=sens)
        assert plan.effective_bits <= budget
        assert len(plan.formats) == 14
    assert set(search_mixed_precision(model, None, 4.5, sensitivity=sens).formats.values()) == {"nvfp4"}
    richer = search_mixed_precision(model, None, 8.0, sensitivity=sens)
    assert richer.estimated_loss_increase() < search_mixed_precision(model, None, 4.75, sensitivity=sens).estimated_loss_increase()
    with pytest.raises(ValueError, match="no calibration batches"):
        search_mixed_precision(model, [], 4.75)


def test_mixed_plan_exports_as_mixed_precision(tiny_llama, tmp_path):
    from nvfp4kit.calibrate.qat import calibrate_input_amax, export_quantized_model
    from nvfp4kit.checkpoint import load_quantized, save_quantized

    model = tiny_llama(init=0.1, seed=3)
    data = _batches(1)
    sens = estimate_sensitivity(model, data)
    # a budget that forces a mix: let the search decide, then make sure all three formats occur
    plan = search_mixed_precision(model, None, 7.0, sensitivity=sens)
    formats = dict(plan.formats)
    formats["model.layers.1.mlp.down_proj"] = "bf16"
    formats["model.layers.0.mlp.down_proj"] = "fp8"
    formats["model.layers.0.self_attn.o_proj"] = "nvfp4"
    prepare_qat(model, formats)
    calibrate_input_amax(model, data)
    save_quantized(export_quantized_model(model), tmp_path / "ck")
    hf = json.loads((tmp_path / "ck" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "MIXED_PRECISION"
    layers = hf["quantized_layers"]
    for n, f in formats.items():
        if f == "bf16":
            assert n not in layers and n in hf["exclude_modules"]
        else:
            assert layers[n]["quant_algo"] == {"nvfp4": "NVFP4", "fp8": "FP8"}[f]
    back = load_quantized(tmp_path / "ck")
    assert {n: r.format for n, r in back.linears.items() if r.format != "bf16"} == {
        n: f for n, f in formats.items() if f != "bf16"}


def test_report_plan_goes_through_progress(caplog):
    import logging

    from nvfp4kit.calibrate.mixed import report_plan

    shapes = {"a": (16, 32), "b": (16, 16)}
    sens = {"a": {"nvfp4": 1.0, "fp8": 0.1, "bf16": 0.0}, "b": {"nvfp4": 0.1, "fp8": 0.0, "bf16": 0.0}}
    plan = plan_from_sensitivity(sens, shapes, 6.0)
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        report_plan(plan)
    text = caplog.text
    assert "mixed precision under 6 bits/weight" in text and f"{plan.effective_bits:.4f}" in text
    assert plan.formats["a"] in text


def test_ptq_precision_plan_for_the_quantize_pipeline(tiny_llama):
    from nvfp4kit.calibrate.mixed import ptq_precision_plan

    model = tiny_llama(init=0.1, seed=4)
    samples = torch.cat(_batches(1))  # [2, 24]
    plan, found = ptq_precision_plan(model, samples, 5.0, exclude=["model.layers.0.mlp.*"])
    assert plan.scheme == "mixed"
    assert plan.layers["lm_head"].format == "bf16"
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert plan.layers[f"model.layers.0.mlp.{p}"].format == "bf16"
        assert f"model.layers.0.mlp.{p}" not in found.formats
    assert found.effective_bits <= 5.0 and len(found.formats) == 11
    for n, f in found.formats.items():
        assert plan.layers[n].format == f and plan.layers[n].quantize_input == (f != "bf16")
