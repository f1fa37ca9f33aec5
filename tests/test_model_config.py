"""Config: HF config.json round trips (pattern and legacy keys), validation errors, presets and
their published parameter counts, the `model info` command."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nvfp4kit.model.config import NemotronConfig
from nvfp4kit.model.params import checkpoint_tensors, count_parameters
from nvfp4kit.model.presets import PRESETS, get_preset


def test_json_round_trip(tmp_path):
    for name in PRESETS:
        cfg = get_preset(name)
        p = cfg.save_json(tmp_path / name)
        assert NemotronConfig.from_json(p) == cfg
        d = json.loads(p.read_text())
        assert d["hybrid_override_pattern"] == cfg.hybrid_override_pattern
        assert d["num_hidden_layers"] == len(cfg.hybrid_override_pattern)


def test_reads_layers_block_type_and_legacy_keys():
    d = {"vocab_size": 300, "hidden_size": 64, "layers_block_type": ["mamba", "moe", "attention", "mlp"],
         "mamba_n_groups": 2, "mamba_d_conv": 3, "mamba_chunk_size": 16, "mamba_dt_limit": [0.0, 1e9],
         "num_local_experts": 4, "num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 16,
         "ssm_state_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "moe_intermediate_size": 32, "intermediate_size": 32, "rope_theta": 10000.0, "num_hidden_layers": 4}
    cfg = NemotronConfig.from_dict(d)
    assert cfg.hybrid_override_pattern == "ME*-"
    assert cfg.layer_types == ["mamba", "moe", "attention", "mlp"]
    assert (cfg.n_groups, cfg.conv_kernel, cfg.chunk_size, cfg.n_routed_experts) == (2, 3, 16, 4)
    assert cfg.time_step_limit == (0.0, 1e9)
    assert cfg.extra == {"rope_theta": 10000.0}  # kept for the round trip, never used
    assert NemotronConfig.from_dict(cfg.to_dict()) == cfg
    # current HF names too
    d2 = dict(d, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"])
    assert NemotronConfig.from_dict(d2).hybrid_override_pattern == "ME*-"


def test_hf_config_reads_our_json_and_we_read_theirs(tmp_path):
    from transformers import NemotronHConfig

    cfg = get_preset("nemotron3-super-120b-a12b")
    d = cfg.to_dict()
    hf = NemotronHConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.hybrid_override_pattern == cfg.hybrid_override_pattern
    assert hf.mtp_hybrid_override_pattern == "*E"
    assert (hf.moe_latent_size, hf.n_routed_experts, hf.num_experts_per_tok) == (1024, 512, 22)
    hf.save_pretrained(tmp_path)
    back = NemotronConfig.from_json(tmp_path)
    for f in ("hybrid_override_pattern", "hidden_size", "mamba_num_heads", "n_groups", "moe_latent_size",
              "routed_scaling_factor", "num_nextn_predict_layers", "mtp_pattern", "chunk_size"):
        assert getattr(back, f) == getattr(cfg, f), f


@pytest.mark.parametrize("pattern,msg", [("MEX*", "'X'"), ("M E", "' '"), ("", "non-empty")])
def test_unknown_pattern_letters(pattern, msg):
    with pytest.raises(ValueError, match=msg):
        get_preset("micro", hybrid_override_pattern=pattern)


def test_bad_layer_type_name():
    with pytest.raises(ValueError, match=r"layers_block_type\[1\].*'conv2d'"):
        NemotronConfig.from_dict({"layers_block_type": ["mamba", "conv2d"]})


@pytest.mark.parametrize("over,msg", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6 is not divisible"),
    (dict(mamba_num_heads=6, n_groups=4), "mamba_num_heads=6 is not divisible by n_groups=4"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok=20 exceeds"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(n_group=3), "n_group=3"),
])
def test_inconsistent_dims(over, msg):
    with pytest.raises(ValueError, match=msg):
        get_preset("micro", **over)


def test_layer_count_mismatch(tmp_path):
    d = get_preset("micro").to_dict()
    d["num_hidden_layers"] = 7
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="num_hidden_layers=7"):
        NemotronConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NemotronConfig.from_json(tmp_path)


def test_nvfp4_block_dims():
    get_preset("nemotron3-super-120b-a12b").check_block_dims(16)
    get_preset("nemotron3-nano-30b-a3b").check_block_dims(16)
    with pytest.raises(ValueError, match="hidden_size=120 is not a multiple of 16"):
        get_preset("micro", hidden_size=120).check_block_dims(16)
    with pytest.raises(ValueError, match="moe_latent_size=40"):
        get_preset("micro", moe_latent_size=40).check_block_dims(16)


def _layer_params(cfg, t):
    """Parameter count of one layer of type t, from the formulas of the architecture."""
    h = cfg.hidden_size
    if t == "M":
        di, gn, H = cfg.mamba_intermediate_size, cfg.n_groups * cfg.ssm_state_size, cfg.mamba_num_heads
        return (2 * di + 2 * gn + H) * h + (di + 2 * gn) * (cfg.conv_kernel + 1) + 3 * H + di + di * h
    if t == "*":
        return 2 * cfg.num_attention_heads * cfg.head_dim * h + 2 * cfg.num_key_value_heads * cfg.head_dim * h
    if t == "-":
        return 2 * cfg.intermediate_size * h
    lat = cfg.moe_latent_size or h
    experts = cfg.n_routed_experts * 2 * lat * cfg.moe_intermediate_size
    latent = 2 * h * cfg.moe_latent_size if cfg.moe_latent_size else 0
    # the score-correction bias is a buffer (a checkpoint tensor, not a trained parameter)
    return cfg.n_routed_experts * h + experts + 2 * h * cfg.moe_shared_expert_intermediate_size + latent


@pytest.mark.parametrize("name", ["micro", "tiny", "nemotron3-nano-30b-a3b"])
def test_counts_match_formulas(name):
    cfg = get_preset(name)
    total = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size * (1 + cfg.num_hidden_layers)
    total += sum(_layer_params(cfg, t) for t in cfg.hybrid_override_pattern)
    counts = count_parameters(cfg)
    assert counts.total == total
    n_moe = cfg.hybrid_override_pattern.count("E")
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 2 * cfg.moe_expert_dim * cfg.moe_intermediate_size
    assert counts.active == total - inactive


def test_published_sizes():
    sup = count_parameters(get_preset("nemotron3-super-120b-a12b"))
    # published: 120.6B total, 12.7B active (MTP not included)
    assert 120.6e9 <= sup.total < 120.7e9
    assert 12.7e9 <= sup.active < 12.8e9
    assert sup.mtp_total > 0
    nano = count_parameters(get_preset("nemotron3-nano-30b-a3b"))
    # published: 31.6B total, 3.2B active (3.6B with the input embeddings)
    assert round(nano.total / 1e9, 1) == 31.6
    assert round((nano.active - nano.by_block["embeddings"]) / 1e9, 1) == 3.2
    assert round(nano.active / 1e9, 1) == 3.6


def test_checkpoint_tensor_list():
    names = checkpoint_tensors(get_preset("micro"))
    assert names["backbone.layers.0.mixer.in_proj.weight"][0] == (2 * 256 + 2 * 2 * 32 + 16, 128)
    assert names["backbone.layers.0.mixer.conv1d.weight"][0] == (256 + 2 * 2 * 32, 1, 4)
    assert names["backbone.layers.2.mixer.gate.e_score_correction_bias"] == ((16,), torch.float32)
    assert names["backbone.layers.2.mixer.experts.15.down_proj.weight"] == ((64, 128), torch.bfloat16)
    assert names["mtp.layers.0.eh_proj.weight"][0] == (128, 256)
    assert "lm_head.weight" in names and "backbone.norm_f.weight" in names


def test_model_info_cli():
    from nvfp4kit.cli.main import app

    r = CliRunner().invoke(app, ["model", "info", "--preset", "nemotron3-nano-30b-a3b"])
    assert r.exit_code == 0, r.output
    assert "31,577,937,344" in r.output
    r = CliRunner().invoke(app, ["model", "info", "--preset", "micro", "--list-tensors"])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert len(lines) == len(checkpoint_tensors(get_preset("micro")))
    assert any(line.startswith("mtp.layers.0.eh_proj.weight") and "[128, 256]" in line for line in lines)
    r = CliRunner().invoke(app, ["model", "info", "--preset", "nope"])
    assert r.exit_code != 0 and "unknown model preset" in r.output
