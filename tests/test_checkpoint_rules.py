"""Fused groups, exclusion patterns, ignore-entry translation, and FP8 KV-cache scales."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from nvfp4kit.checkpoint import (
    CheckpointError,
    QuantizedLinearWeight,
    QuantizedModel,
    check_exclude_patterns,
    check_shared_global_scales,
    is_excluded,
    load_quantized,
    save_quantized,
)
from nvfp4kit.checkpoint.compressed_tensors import exclude_pattern, ignore_entry
from nvfp4kit.checkpoint.rules import expand_regex_patterns
from nvfp4kit.formats.nvfp4 import quantize_parts
from nvfp4kit.policy import fused_groups


def test_groups_llama_and_nemotron_names():
    names = [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
        # Nemotron-H: attention in ``mixer``; MLP / experts have no gate (alone); Mamba in_proj alone
        "backbone.layers.3.mixer.v_proj.weight", "backbone.layers.3.mixer.q_proj.weight",
        "backbone.layers.3.mixer.k_proj.weight", "backbone.layers.1.mixer.in_proj",
        "backbone.layers.5.mixer.experts.0.up_proj", "backbone.layers.5.mixer.experts.0.down_proj",
        "backbone.layers.5.mixer.shared_experts.up_proj",
        # Mixtral experts
        "model.layers.0.block_sparse_moe.experts.2.w1", "model.layers.0.block_sparse_moe.experts.2.w3",
        "model.layers.0.block_sparse_moe.experts.2.w2",
        # a lone q_proj (different parent) is no group
        "model.layers.9.self_attn.q_proj",
    ]
    assert sorted(fused_groups(names), key=lambda g: g[0]) == [
        ["backbone.layers.3.mixer.q_proj.weight", "backbone.layers.3.mixer.k_proj.weight",
         "backbone.layers.3.mixer.v_proj.weight"],
        ["model.layers.0.block_sparse_moe.experts.2.w1", "model.layers.0.block_sparse_moe.experts.2.w3"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
    ]


def test_check_shared_global_scales():
    ok = {"a.q_proj": torch.tensor(0.5), "a.k_proj": torch.tensor(0.5), "a.o_proj": torch.tensor(2.0)}
    assert check_shared_global_scales(ok) == []
    bad = {**ok, "a.v_proj": torch.tensor(0.25)}
    with pytest.raises(CheckpointError, match=r"a\.v_proj=0\.25"):
        check_shared_global_scales(bad)
    assert len(check_shared_global_scales(bad, strict=False)) == 1


def test_exclusion_patterns():
    modules = ["lm_head", "model.layers.0.mlp.gate", "model.layers.10.mlp.up_proj", "model.embed_tokens"]
    assert is_excluded("model.layers.0.mlp.gate", ["*.gate"])
    assert not is_excluded("model.layers.0.mlp.gate_proj", ["*.gate"])
    assert is_excluded("model.layers.10.mlp.up_proj", ["re:.*layers\\.1\\d\\."])
    check_exclude_patterns(["lm_head", "*.gate", "model.layers.1?.*"], modules)
    with pytest.raises(CheckpointError, match=r"\['model\.layer\.\*', 'head'\] match no module"):
        check_exclude_patterns(["model.layer.*", "lm_head", "head"], modules)
    assert expand_regex_patterns(["lm_head", "re:.*embed.*", "re:nothing"], modules) == ["lm_head", "model.embed_tokens"]


NAME = st.text(alphabet="ab._0", min_size=0, max_size=8)
GLOB = st.lists(st.sampled_from(["a", "b", ".", "_", "0", "*", "?", "[ab]", "[!a]"]), min_size=1, max_size=6).map("".join)


@given(pattern=GLOB, names=st.lists(NAME, min_size=1, max_size=8))
def test_ignore_entry_matches_like_fnmatch(pattern, names):
    entry = ignore_entry(pattern)
    for n in names:
        ct_match = re.match(entry[3:], n) is not None if entry.startswith("re:") else entry == n
        assert ct_match == fnmatch.fnmatchcase(n, pattern), (pattern, entry, n)
    assert exclude_pattern(entry) == pattern


@pytest.mark.parametrize("fmt, k_name", [("modelopt", "self_attn.k_proj.k_scale"), ("compressed-tensors", "self_attn.k_scale")])
def test_fp8_kv_cache_scales(tmp_path, fmt, k_name):
    w = torch.randn(32, 32)
    parts = quantize_parts(w)  # k_proj is a quantized Linear too: its k_scale sits beside its weights
    m = QuantizedModel(
        linears={f"model.layers.0.self_attn.{n}": QuantizedLinearWeight("nvfp4", (32, 32), nvfp4=parts, input_amax=1.0)
                 for n in ("q_proj", "k_proj", "v_proj")},
        config={"model_type": "llama"},
        kv_cache_format="fp8",
        kv_cache_amax={"model.layers.0.self_attn": (44.8, 8.96)},
    )
    out = save_quantized(m, tmp_path / "q", fmt)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        k = f.get_tensor(f"model.layers.0.{k_name}")
    assert k.dtype == torch.float32 and k.reshape(-1).item() == torch.tensor(44.8 / 448, dtype=torch.float64).float().item()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"]["num_bits"] == 8
    if fmt == "modelopt":
        assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    back = load_quantized(out)
    assert sorted(back.linears) == [f"model.layers.0.self_attn.{n}" for n in ("k_proj", "q_proj", "v_proj")]
    assert back.kv_cache_format == "fp8"
    k_amax, v_amax = back.kv_cache_amax["model.layers.0.self_attn"]
    assert k_amax == pytest.approx(44.8, rel=2**-22) and v_amax == pytest.approx(8.96, rel=2**-22)
