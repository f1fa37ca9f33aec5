"""The serving check (nvfp4kit.checkpoint.serving): a good checkpoint of each format passes; one
hand-broken for each rule fails with a finding naming the tensor; writers refuse to finish a failing
checkpoint; ``nvfp4kit inspect --check-serving``."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvfp4kit.checkpoint import CheckpointError, QuantizedLinearWeight, QuantizedModel, save_quantized
from nvfp4kit.checkpoint.serving import check_serving, errors, verify_serving
from nvfp4kit.checkpoint.staged import StagedCheckpoint
from nvfp4kit.cli.main import app
from nvfp4kit.formats.nvfp4 import quantize_parts

FORMATS = ("modelopt", "compressed-tensors")
H = 256  # K / 16 = 16 block-scale columns: what SGLang's NVFP4 MoE asserts, so a good checkpoint has no warning
# on-disk names of the two formats, written here from the spec (docs/checkpoints), not from the code
GLOBAL = {"modelopt": "weight_scale_2", "compressed-tensors": "weight_global_scale"}
INPUT = {"modelopt": "input_scale", "compressed-tensors": "input_global_scale"}
PACKED = {"modelopt": "weight", "compressed-tensors": "weight_packed"}
K_SCALE = {"modelopt": "model.layers.0.self_attn.k_proj.k_scale", "compressed-tensors": "model.layers.0.self_attn.k_scale"}
V_SCALE = {"modelopt": "model.layers.0.self_attn.v_proj.v_scale", "compressed-tensors": "model.layers.0.self_attn.v_scale"}


@functools.lru_cache(maxsize=None)
def nvfp4(seed, global_amax=None, input_amax=2.0, n=32, k=H):
    """An NVFP4 record (cached: records are not changed by the writers, and quantizing is the slow part)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    g = None if global_amax is None else torch.tensor(global_amax)
    return QuantizedLinearWeight("nvfp4", (n, k), nvfp4=quantize_parts(w, global_amax=g), input_amax=input_amax)


def model(quantized_head: bool = False) -> QuantizedModel:
    """Layer 0: attention (q/k/v sharing scales) + dense MLP (gate/up sharing); layer 1: an MoE of two
    experts and a high-precision router; a high-precision (or quantized) lm_head; an FP8 KV cache."""
    m = QuantizedModel(config={"model_type": "qwen2_moe", "hidden_size": H, "tie_word_embeddings": False},
                       kv_cache_format="fp8")
    a = "model.layers.0.self_attn"
    for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
        m.linears[f"{a}.{p}"] = nvfp4(i, global_amax=4.0, input_amax=3.0)
    m.linears[f"{a}.o_proj"] = nvfp4(3)
    for i, p in enumerate(("gate_proj", "up_proj")):
        m.linears[f"model.layers.0.mlp.{p}"] = nvfp4(4 + i, global_amax=5.0, input_amax=2.5)
    m.linears["model.layers.0.mlp.down_proj"] = nvfp4(6)
    for e in range(2):
        x = f"model.layers.1.mlp.experts.{e}"
        for i, p in enumerate(("gate_proj", "up_proj")):
            m.linears[f"{x}.{p}"] = nvfp4(10 + 3 * e + i, global_amax=4.5 + e, input_amax=1.5 + e)
        m.linears[f"{x}.down_proj"] = nvfp4(12 + 3 * e, input_amax=0.5 + e)
    m.tensors["model.layers.1.mlp.gate.weight"] = torch.randn(2, H).bfloat16()
    m.tensors["model.embed_tokens.weight"] = torch.randn(32, H).bfloat16()
    m.tensors["model.norm.weight"] = torch.ones(H).bfloat16()
    m.exclude_modules = ["model.layers.1.mlp.gate"]
    if quantized_head:
        m.linears["lm_head"] = nvfp4(20, n=32)
    else:
        m.tensors["lm_head.weight"] = torch.randn(32, H).bfloat16()
        m.exclude_modules.append("lm_head")
    m.kv_cache_amax[a] = (3.5, 1.25)
    return m


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint of each format written by save_quantized (so it passed the check once already)."""
    root = tmp_path_factory.mktemp("good")
    return {fmt: save_quantized(model(), root / fmt.replace("-", "_"), fmt) for fmt in FORMATS}


def copy_of(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_tensors(ck, fn):
    path = ck / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def failing(ck, rule):
    """The error findings of ``rule`` (asserting there is at least one)."""
    found = [f for f in errors(check_serving(ck)) if f.rule == rule]
    assert found, f"no {rule!r} finding in {check_serving(ck)}"
    return found


def text(findings) -> str:
    return "\n".join(str(f) for f in findings)


# ----------------------------------------------------------------------------- good checkpoints pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_checkpoint_passes(good, fmt):
    assert check_serving(good[fmt]) == []
    assert verify_serving(good[fmt]) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_fully_quantized_head_passes(tmp_path, fmt):
    ck = save_quantized(model(quantized_head=True), tmp_path / "q", fmt)
    assert check_serving(ck) == []


def test_unquantized_checkpoint_passes_unless_it_holds_packed_tensors(tmp_path, good):
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(4, 16).bfloat16()}, str(plain / "model.safetensors"))
    (plain / "config.json").write_text("{}")
    assert check_serving(plain) == []
    stripped = copy_of(good["modelopt"], tmp_path / "stripped")  # quantization markers removed
    (stripped / "hf_quant_config.json").unlink()
    edit_json(stripped / "config.json", lambda d: d.pop("quantization_config"))
    assert "no quantization config" in text(failing(stripped, "config"))


# ----------------------------------------------------------------------------- each rule, hand-broken


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ("global", "input"))
def test_unshared_fused_scale(tmp_path, good, fmt, which):
    ck = copy_of(good[fmt], tmp_path / "c")
    leaf = GLOBAL[fmt] if which == "global" else INPUT[fmt]
    name = f"model.layers.0.self_attn.k_proj.{leaf}"
    edit_tensors(ck, lambda t: t.__setitem__(name, t[name] * 1.5))
    found = failing(ck, "fused")
    assert len(found) == 1 and name in str(found[0]) and "model.layers.0.self_attn.q_proj" in str(found[0])
    # the expert's gate/up pair is a fused group too
    ck2 = copy_of(good[fmt], tmp_path / "c2")
    name = f"model.layers.1.mlp.experts.1.up_proj.{leaf}"
    edit_tensors(ck2, lambda t: t.__setitem__(name, t[name] * 2))
    assert name in text(failing(ck2, "fused"))
    # strict_fused=False (what convert keeps from a source) lets only this rule through
    assert errors(check_serving(ck2), strict_fused=False) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_expert_input_scale(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    name = f"model.layers.1.mlp.experts.1.down_proj.{INPUT[fmt]}"
    edit_tensors(ck, lambda t: t.pop(name))
    assert "model.layers.1.mlp.experts.1.down_proj" in text(failing(ck, "scheme"))
    assert "model.layers.1.mlp.experts.*.down_proj" in text(failing(ck, "experts"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_expert(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    edit_tensors(ck, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.1.mlp.experts.0.")])
    assert "experts [0] are missing" in text(failing(ck, "experts"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", (0.0, float("nan"), -1.0))
def test_zero_nan_negative_input_scale(tmp_path, good, fmt, value):
    ck = copy_of(good[fmt], tmp_path / "c")
    name = f"model.layers.1.mlp.experts.0.down_proj.{INPUT[fmt]}"
    edit_tensors(ck, lambda t: t[name].fill_(value))
    assert name in text(failing(ck, "scales"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_weight_global_scale(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    name = f"model.layers.0.mlp.down_proj.{GLOBAL[fmt]}"
    edit_tensors(ck, lambda t: t[name].zero_())
    # modelopt: 0 with non-zero block scales serves as zeros; compressed-tensors: engines divide by it
    assert name in text(failing(ck, "scales"))


def test_zero_weight_global_scale_of_an_all_zero_weight_is_fine(tmp_path):
    m = model()
    parts = quantize_parts(torch.zeros(32, H))
    m.linears["model.layers.0.mlp.down_proj"] = QuantizedLinearWeight(
        "nvfp4", (32, H), nvfp4=type(parts)(parts.packed, parts.block_scale, torch.zeros(())), input_amax=1.0)
    ck = save_quantized(m, tmp_path / "q", "modelopt")
    assert check_serving(ck) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_block_scale(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    edit_tensors(ck, lambda t: t[name].view(torch.uint8).__setitem__((3, 2), 0x7F))
    found = text(failing(ck, "scales"))
    assert name in found and "1 NaN" in found


@pytest.mark.parametrize("fmt", FORMATS)
def test_bogus_ignore_name(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    bogus = "model.layers.0.mlp.gaet_proj"
    edit_json(ck / "config.json", lambda d: d["quantization_config"]["ignore"].append(bogus))
    if fmt == "modelopt":  # both forms, kept consistent
        edit_json(ck / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(bogus))
    found = failing(ck, "exclusions")
    assert len(found) == 1 and bogus in str(found[0]) and "matches no module" in str(found[0])
    assert not [f for f in errors(check_serving(ck)) if f.rule == "config"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exclusion_matching_a_quantized_linear(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    edit_json(ck / "config.json", lambda d: d["quantization_config"]["ignore"].append("model.layers.0.mlp.down_proj"))
    if fmt == "modelopt":
        edit_json(ck / "hf_quant_config.json",
                  lambda d: d["quantization"]["exclude_modules"].append("model.layers.0.mlp.down_proj"))
    assert "model.layers.0.mlp.down_proj: quantized (nvfp4)" in text(failing(ck, "exclusions"))


def test_modelopt_exclusion_matches_as_substring_too(tmp_path, good):
    """vLLM's modelopt loader also excludes a module whose name contains an exclude entry."""
    ck = copy_of(good["modelopt"], tmp_path / "c")
    entry = "model.layers.0.mlp.gate"  # a substring of model.layers.0.mlp.gate_proj
    edit_json(ck / "config.json", lambda d: d["quantization_config"]["ignore"].append(entry))
    edit_json(ck / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(entry))
    found = text(failing(ck, "exclusions"))
    assert "model.layers.0.mlp.gate_proj: quantized" in found and repr(entry) in found


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_quantized_lm_head(tmp_path, fmt):
    ck = save_quantized(model(quantized_head=True), tmp_path / "q", fmt)
    edit_tensors(ck, lambda t: t.pop(f"lm_head.{GLOBAL[fmt]}"))
    assert f"lm_head.{GLOBAL[fmt]}" in text(failing(ck, "tensors"))
    # quantized but excluded: the engines would load packed bytes as a bf16 head
    ck2 = save_quantized(model(quantized_head=True), tmp_path / "q2", fmt)
    edit_json(ck2 / "config.json", lambda d: d["quantization_config"]["ignore"].append("lm_head"))
    if fmt == "modelopt":
        edit_json(ck2 / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append("lm_head"))
    assert "lm_head: quantized" in text(failing(ck2, "lm_head"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_high_precision_lm_head_not_excluded(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    edit_json(ck / "config.json", lambda d: d["quantization_config"]["ignore"].remove("lm_head"))
    if fmt == "modelopt":
        edit_json(ck / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].remove("lm_head"))
    found = failing(ck, "lm_head")
    assert len(found) == 1 and found[0].where == "lm_head"


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_kv_scale(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    edit_tensors(ck, lambda t: t.pop(V_SCALE[fmt]))
    found = failing(ck, "kv")
    assert len(found) == 1 and found[0].where == V_SCALE[fmt]
    # the other format's name is not where this format's engines look
    ck2 = copy_of(good[fmt], tmp_path / "c2")
    other = V_SCALE["compressed-tensors" if fmt == "modelopt" else "modelopt"]
    edit_tensors(ck2, lambda t: t.__setitem__(other, t.pop(V_SCALE[fmt])))
    assert {f.where.split(" ")[0] for f in failing(ck2, "kv")} == {V_SCALE[fmt], other}


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_kv_scale(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    edit_tensors(ck, lambda t: t[K_SCALE[fmt]].zero_())
    assert K_SCALE[fmt] in text(failing(ck, "kv"))


def test_mismatched_modelopt_configs(tmp_path, good):
    ck = copy_of(good["modelopt"], tmp_path / "c")
    edit_json(ck / "config.json", lambda d: d["quantization_config"].__setitem__("quant_algo", "W4A16_NVFP4"))
    found = text(failing(ck, "config"))
    assert "hf_quant_config.json vs config.json" in found and "'NVFP4' vs 'W4A16_NVFP4'" in found
    ck2 = copy_of(good["modelopt"], tmp_path / "c2")
    edit_json(ck2 / "config.json", lambda d: d["quantization_config"].pop("kv_cache_scheme"))
    assert "kv_cache_quant_algo 'FP8'" in text(failing(ck2, "config"))
    ck3 = copy_of(good["modelopt"], tmp_path / "c3")
    (ck3 / "hf_quant_config.json").unlink()
    assert "hf_quant_config.json: missing" in text(failing(ck3, "config"))
    # without config.json's form the engines fall back to hf_quant_config.json: a warning, not an error
    edit_json(ck2 / "config.json", lambda d: d.pop("quantization_config"))
    assert errors(check_serving(ck2)) == []
    assert [(f.rule, f.where, f.severity) for f in check_serving(ck2)] == [("config", "config.json", "warning")]
    ck4 = copy_of(good["modelopt"], tmp_path / "c4")
    edit_json(ck4 / "hf_quant_config.json", lambda d: d["quantization"].pop("group_size"))
    assert "lacks ['group_size']" in text(failing(ck4, "config"))


def test_bad_compressed_tensors_config(tmp_path, good):
    ck = copy_of(good["compressed-tensors"], tmp_path / "c")
    edit_json(ck / "config.json",
              lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("strategy", "group"))
    assert "config_groups.group_0.weights" in text(failing(ck, "config"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_shapes_and_dtypes(tmp_path, good, fmt):
    ck = copy_of(good[fmt], tmp_path / "c")
    scale = "model.layers.0.self_attn.o_proj.weight_scale"
    edit_tensors(ck, lambda t: t.__setitem__(scale, t[scale][:, :8].contiguous()))
    found = text(failing(ck, "tensors"))
    assert scale in found and f"F8_E4M3 [32, {H // 16}]" in found and "shape [32, 8]" in found
    ck2 = copy_of(good[fmt], tmp_path / "c2")
    g = f"model.layers.0.mlp.down_proj.{GLOBAL[fmt]}"
    edit_tensors(ck2, lambda t: t.__setitem__(g, t[g].to(torch.bfloat16)))
    assert g in text(failing(ck2, "tensors"))
    ck3 = copy_of(good[fmt], tmp_path / "c3")
    w = f"model.layers.0.mlp.down_proj.{PACKED[fmt]}"
    edit_tensors(ck3, lambda t: t.__setitem__(w, t[w][:, : H // 2 - 4].contiguous()))  # K = 248
    assert "K = 248 is not a multiple of 16" in text(failing(ck3, "tensors"))


# ----------------------------------------------------------------------------- writers refuse to finish


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_quantized_refuses_and_leaves_nothing(tmp_path, fmt):
    m = model()
    m.exclude_modules.append("model.layers.0.mlp.down_proj")  # excludes a quantized Linear
    with pytest.raises(CheckpointError, match=r"(?s)not written.*model\.layers\.0\.mlp\.down_proj: quantized"):
        save_quantized(m, tmp_path / "q", fmt)
    assert list(tmp_path.iterdir()) == []


def test_staged_finish_refuses_and_leaves_no_output(tmp_path):
    m = model()
    m.exclude_modules.append("model.layers.0.mlp.typo")
    sink = StagedCheckpoint(tmp_path / "q", "modelopt", {"job": 1}, config=m.config,
                            exclude_modules=m.exclude_modules, kv_cache_format="fp8")
    for kind, name, value in m.entries():
        getattr(sink, kind)(name, *value) if kind == "kv" else getattr(sink, kind)(name, value)
    sink.end_unit(0, {})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.typo"):
        sink.finish()
    assert not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.partial-")]


def test_streaming_weight_only_fp8_as_modelopt_is_refused_before_work(tmp_path):
    from nvfp4kit.checkpoint import quantize_checkpoint

    with pytest.raises(CheckpointError, match="weight-only FP8 cannot be written in the modelopt format"):
        quantize_checkpoint(tmp_path / "does-not-matter", tmp_path / "q", "fp8", format="modelopt")


# ----------------------------------------------------------------------------- the command


def test_cli_check_serving(tmp_path, good):
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(good["modelopt"]), "--check-serving"])
    assert res.exit_code == 0, res.output
    assert "passes the vLLM / SGLang serving checks" in res.output
    ck = copy_of(good["compressed-tensors"], tmp_path / "c")
    edit_tensors(ck, lambda t: t.pop(V_SCALE["compressed-tensors"]))
    res = runner.invoke(app, ["inspect", str(ck), "--check-serving"])
    assert res.exit_code == 1, res.output
    assert f"error: [kv] {V_SCALE['compressed-tensors']}: missing" in res.output
