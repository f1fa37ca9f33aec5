"""Precision plans by module name, fused groups, and calibration text sources."""

import json

import pytest
import torch

from nvfp4kit.calibrate.data import builtin_text, load_text, token_samples
from nvfp4kit.policy import fused_groups, plan_precision


def _hybrid_names():
    names = {}
    for i in range(4):
        p = f"backbone.layers.{i}.mixer."
        if i == 0:  # Mamba
            names[p + "in_proj"] = (256, 64)
            names[p + "out_proj"] = (64, 128)
        elif i == 1:  # attention
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names[p + n] = (64, 64)
        else:  # latent MoE
            names[p + "gate"] = (8, 64)
            names[p + "fc1_latent_proj"] = (32, 64)
            names[p + "fc2_latent_proj"] = (64, 32)
            names[p + "shared_experts.up_proj"] = (128, 64)
            names[p + "shared_experts.down_proj"] = (64, 128)
            for e in range(3):
                names[p + f"experts.{e}.up_proj"] = (64, 32)
                names[p + f"experts.{e}.down_proj"] = (32, 64)
    names["backbone.embeddings"] = (64, 100)
    names["mtp.layers.0.mixer.experts.0.up_proj"] = (64, 32)
    names["lm_head"] = (100, 64)
    return names


def test_nemotron3_super_preset_mirrors_the_release_map():
    plan = plan_precision(_hybrid_names(), "mixed", recipe="nemotron3-super")
    f = {n: p.format for n, p in plan.layers.items()}
    assert f["backbone.layers.2.mixer.experts.1.up_proj"] == "nvfp4"
    assert f["backbone.layers.3.mixer.experts.2.down_proj"] == "nvfp4"
    assert f["backbone.layers.2.mixer.shared_experts.up_proj"] == "fp8"
    assert f["backbone.layers.0.mixer.in_proj"] == "fp8"
    assert f["backbone.layers.0.mixer.out_proj"] == "fp8"
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f[f"backbone.layers.1.mixer.{n}"] == "bf16"
    assert f["backbone.layers.2.mixer.fc1_latent_proj"] == "bf16"
    assert f["backbone.layers.2.mixer.fc2_latent_proj"] == "bf16"
    assert f["backbone.layers.2.mixer.gate"] == "bf16"  # router
    assert f["mtp.layers.0.mixer.experts.0.up_proj"] == "bf16"  # MTP stays high precision
    assert f["lm_head"] == "bf16" and f["backbone.embeddings"] == "bf16"
    assert all(plan.layers[n].quantize_input for n in plan.quantized())
    assert set(plan.excluded()) == {n for n, v in f.items() if v == "bf16"}


def test_schemes_exclusions_and_k_multiple_of_16():
    names = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 40),
             "model.layers.1.mlp.up_proj": (64, 64), "lm_head": (99, 64)}
    p = plan_precision(names, "w4a16", exclude=["model.layers.1.*"])
    assert p.layers["model.layers.0.self_attn.q_proj"].format == "nvfp4"
    assert not p.layers["model.layers.0.self_attn.q_proj"].quantize_input
    assert p.layers["model.layers.0.mlp.down_proj"].format == "bf16"  # K = 40
    assert "multiple of 16" in p.layers["model.layers.0.mlp.down_proj"].reason
    assert p.layers["model.layers.1.mlp.up_proj"].format == "bf16"
    assert p.layers["lm_head"].format == "bf16"
    p8 = plan_precision(names, "fp8")
    assert p8.layers["model.layers.0.mlp.down_proj"].format == "fp8"  # FP8 has no K constraint
    assert p8.layers["model.layers.0.mlp.down_proj"].quantize_input
    with pytest.raises(ValueError, match="--scheme"):
        plan_precision(names, "int4")
    with pytest.raises(ValueError, match="needs a --recipe"):
        plan_precision(names, "mixed")
    with pytest.raises(ValueError, match="--recipe"):
        plan_precision(names, "w4a4", recipe="nope")


def test_fused_groups():
    names = ["a.self_attn.q_proj", "a.self_attn.k_proj", "a.self_attn.v_proj", "a.self_attn.o_proj",
             "a.mlp.gate_proj", "a.mlp.up_proj", "a.mlp.down_proj", "b.mlp.up_proj",
             "e.experts.0.gate_proj", "e.experts.0.up_proj", "e.experts.1.gate_proj", "e.experts.1.up_proj"]
    groups = sorted(sorted(g) for g in fused_groups(names))
    assert groups == [
        ["a.mlp.gate_proj", "a.mlp.up_proj"],
        ["a.self_attn.k_proj", "a.self_attn.q_proj", "a.self_attn.v_proj"],
        ["e.experts.0.gate_proj", "e.experts.0.up_proj"],
        ["e.experts.1.gate_proj", "e.experts.1.up_proj"],
    ]


def test_builtin_text_splits_are_disjoint_and_cover_the_corpus():
    from pydoc_data.topics import topics

    calib, ev = builtin_text("calib"), builtin_text("eval")
    assert len(calib) > 300_000 and len(ev) > 50_000
    parts_c = set(calib.split("\n\n"))
    for k in sorted(topics)[3::4]:
        assert topics[k] in ev and topics[k] not in calib
    assert all(topics[k] in calib for i, k in enumerate(sorted(topics)) if i % 4 != 3)
    assert parts_c
    with pytest.raises(ValueError, match="split"):
        builtin_text("train")


def test_load_text_files_and_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert load_text(tmp_path / "a.txt") == "hello world"
    rows = [{"text": "first row"}, {"text": "second row"}, {"other": 1, "text": ""}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_text(tmp_path / "d.jsonl") == "first row\n\nsecond row"
    with pytest.raises(ValueError, match=r"d\.jsonl' has no text records: no 'body' field"):
        load_text(tmp_path / "d.jsonl", text_field="body")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    assert load_text(None, "eval") == builtin_text("eval")


def test_token_samples():
    ids = torch.arange(100)
    s = token_samples(ids, 3, 30)
    assert s.shape == (3, 30) and torch.equal(s[2], torch.arange(60, 90))
    assert token_samples(ids, 10, 30).shape == (3, 30)  # text runs out
    with pytest.raises(ValueError, match="fewer than one sample"):
        token_samples(ids, 1, 101)
