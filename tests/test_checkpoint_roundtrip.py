"""save_quantized / load_quantized: both formats, sharding, atomic output, configs, copied files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from nvfp4kit.checkpoint import (
    CheckpointError,
    QuantizedLinearWeight,
    QuantizedModel,
    dequantize_linear,
    dequantized_state_dict,
    detect_format,
    load_quantized,
    save_quantized,
)
from nvfp4kit.formats.nvfp4 import quantize_parts

FORMATS = ("modelopt", "compressed-tensors")


def nvfp4_linear(n, k, seed, global_amax=None, input_amax=1.5, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    parts = quantize_parts(w, global_amax=global_amax)
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return QuantizedLinearWeight("nvfp4", (n, k), nvfp4=parts, input_amax=input_amax, bias=b)


def fp8_linear(n, k, seed, input_amax=2.0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    return QuantizedLinearWeight("fp8", (n, k), fp8_weight=w, fp8_weight_scale=torch.tensor(0.0125), input_amax=input_amax)


def tiny_model(source_dir=None) -> QuantizedModel:
    m = QuantizedModel(config={"model_type": "llama", "hidden_size": 32}, source_dir=source_dir)
    shared = torch.tensor(4.5)  # q/k/v share one global amax
    for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
        m.linears[f"model.layers.0.self_attn.{n}"] = nvfp4_linear(32, 32, i, global_amax=shared, input_amax=2.5)
    m.linears["model.layers.0.self_attn.o_proj"] = nvfp4_linear(32, 32, 7, input_amax=None, bias=True)
    m.linears["model.layers.0.mlp.down_proj"] = nvfp4_linear(32, 64, 8, input_amax=3.0)
    m.tensors["model.embed_tokens.weight"] = torch.randn(50, 32).bfloat16()
    m.tensors["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    m.tensors["lm_head.weight"] = torch.randn(50, 32).bfloat16()
    m.exclude_modules = ["lm_head"]
    return m


def assert_same_linear(a: QuantizedLinearWeight, b: QuantizedLinearWeight):
    assert a.format == b.format and tuple(a.shape) == tuple(b.shape)
    if a.format == "nvfp4":
        assert torch.equal(a.nvfp4.packed, b.nvfp4.packed)
        assert torch.equal(a.nvfp4.block_scale.view(torch.uint8), b.nvfp4.block_scale.view(torch.uint8))
    else:
        assert torch.equal(a.fp8_weight.view(torch.uint8), b.fp8_weight.view(torch.uint8))
    assert (a.input_amax is None) == (b.input_amax is None)
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        assert torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_bytes_and_values(tmp_path, fmt):
    m = tiny_model()
    out = save_quantized(m, tmp_path / "q", fmt)
    back = load_quantized(out)
    assert set(back.linears) == set(m.linears)
    assert set(back.tensors) == set(m.tensors)
    for n, lw in m.linears.items():
        assert_same_linear(lw, back.linears[n])
        if fmt == "modelopt":  # decode scale stored as is
            assert torch.equal(lw.nvfp4.global_decode_scale, back.linears[n].nvfp4.global_decode_scale)
            assert torch.equal(dequantize_linear(lw, torch.float32), dequantize_linear(back.linears[n], torch.float32))
        else:  # stored as the float32 reciprocal; read back as its reciprocal: within one float32 ulp
            g0 = lw.nvfp4.global_decode_scale.reshape(1)
            g1 = back.linears[n].nvfp4.global_decode_scale.reshape(1)
            assert abs(g0.view(torch.int32).item() - g1.view(torch.int32).item()) <= 1
        if lw.input_amax is not None:
            assert back.linears[n].input_amax == pytest.approx(lw.input_amax, rel=2**-22)
    for n, t in m.tensors.items():
        assert torch.equal(back.tensors[n], t)
    assert back.config == m.config
    assert back.exclude_modules == ["lm_head"]


def test_modelopt_on_disk_layout(tmp_path):
    m = tiny_model()
    out = save_quantized(m, tmp_path / "q", "modelopt")
    hf = json.loads((out / "hf_quant_config.json").read_text())
    q = hf["quantization"]
    # o_proj has no input scale -> per-layer algos differ -> MIXED_PRECISION
    assert q["quant_algo"] == "MIXED_PRECISION"
    assert q["quantized_layers"]["model.layers.0.self_attn.q_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert q["quantized_layers"]["model.layers.0.self_attn.o_proj"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
    assert q["exclude_modules"] == ["lm_head"]
    assert hf["producer"]["name"] == "nvfp4kit"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_slice(f"{q}.weight").get_dtype() == "U8"
        assert f.get_slice(f"{q}.weight").get_shape() == [32, 16]
        assert f.get_slice(f"{q}.weight_scale").get_dtype() == "F8_E4M3"
        assert f.get_slice(f"{q}.weight_scale").get_shape() == [32, 2]
        assert f.get_slice(f"{q}.weight_scale_2").get_shape() == []
        assert f.get_slice(f"{q}.input_scale").get_dtype() == "F32"
        # input_scale is the decode direction amax / 2688
        assert f.get_tensor(f"{q}.input_scale").item() == torch.tensor(2.5 / 2688, dtype=torch.float64).float().item()
        assert f.get_tensor(f"{q}.weight_scale_2").item() == m.linears[q].nvfp4.global_decode_scale.item()
        assert "model.layers.0.self_attn.o_proj.input_scale" not in f.keys()
        assert f.metadata() == {"format": "pt"}


def test_compressed_tensors_on_disk_layout(tmp_path):
    m = tiny_model()
    for lw in m.linears.values():
        lw.input_amax = 2.0  # one scheme -> a single nvfp4-pack-quantized group
    out = save_quantized(m, tmp_path / "q", "compressed-tensors")
    assert not (out / "hf_quant_config.json").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    g = qc["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"]
    assert g["weights"]["strategy"] == "tensor_group" and g["weights"]["group_size"] == 16
    assert g["input_activations"]["dynamic"] == "local"
    assert qc["ignore"] == ["lm_head"]
    q = "model.layers.0.self_attn.q_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice(f"{q}.weight_packed").get_dtype() == "U8"
        assert f.get_slice(f"{q}.weight_global_scale").get_shape() == [1]
        ws = f.get_tensor(f"{q}.weight_global_scale")
        ig = f.get_tensor(f"{q}.input_global_scale")
        assert f"{q}.weight" not in f.keys()
    # encode direction: the float32 reciprocal of the decode scale
    g_dec = m.linears[q].nvfp4.global_decode_scale.float()
    assert ws.item() == (torch.ones(()) / g_dec).item()
    assert ig.item() == torch.tensor(2688.0 / 2.0, dtype=torch.float32).item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_index(tmp_path, fmt):
    m = tiny_model()
    out = save_quantized(m, tmp_path / "q", fmt, max_shard_size=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    seen = {}
    total = 0
    for fname in files:
        with safe_open(str(out / fname), "pt") as f:
            for k in f.keys():
                seen[k] = fname
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    back = load_quantized(out)
    for name, lw in m.linears.items():
        assert_same_linear(lw, back.linears[name])


def test_mixed_fp8_nvfp4(tmp_path):
    m = tiny_model()
    m.linears["model.layers.0.mlp.up_proj"] = fp8_linear(64, 32, 3)
    m.linears["model.layers.0.mlp.gate_proj"] = fp8_linear(64, 32, 4)
    for fmt in FORMATS:
        out = save_quantized(m, tmp_path / fmt, fmt)
        back = load_quantized(out)
        for name, lw in m.linears.items():
            assert_same_linear(lw, back.linears[name])
        up = back.linears["model.layers.0.mlp.up_proj"]
        assert up.fp8_weight_scale.item() == torch.tensor(0.0125).item()
        info = detect_format(out)
        assert info.scheme == ("MIXED_PRECISION" if fmt == "modelopt" else "mixed-precision")


def test_tokenizer_files_copied_weights_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        (src / name).write_text(json.dumps({"name": name}))
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    (src / "model.safetensors").write_bytes(b"not copied either")
    (src / "config.json").write_text(json.dumps({"model_type": "stale"}))
    out = save_quantized(tiny_model(source_dir=str(src)), tmp_path / "q", "modelopt")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        assert (out / name).read_text() == (src / name).read_text()
    assert not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_existing_output_refused_and_untouched(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        save_quantized(tiny_model(), out)
    assert os.listdir(out) == ["keep.txt"]
    save_quantized(tiny_model(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temp dirs left


def test_failure_leaves_nothing(tmp_path):
    m = tiny_model()
    # a bad record after good ones: K of the packed weight disagrees with the declared shape
    bad = nvfp4_linear(32, 32, 9)
    m.linears["model.layers.0.mlp.up_proj"] = QuantizedLinearWeight("nvfp4", (32, 48), nvfp4=bad.nvfp4)
    with pytest.raises(CheckpointError, match="up_proj"):
        save_quantized(m, tmp_path / "q", max_shard_size=1000)
    assert list(tmp_path.iterdir()) == []


def test_fused_group_must_share_global_scale(tmp_path):
    m = tiny_model()
    m.linears["model.layers.0.self_attn.k_proj"] = nvfp4_linear(32, 32, 1, global_amax=torch.tensor(9.0), input_amax=2.5)
    with pytest.raises(CheckpointError, match="k_proj"):
        save_quantized(m, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    out = save_quantized(m, tmp_path / "q2", strict_fused=False)
    assert (out / "model.safetensors").exists()


def test_dequantized_state_dict(tmp_path):
    m = tiny_model()
    sd = dequantized_state_dict(load_quantized(save_quantized(m, tmp_path / "q")), torch.bfloat16)
    q = m.linears["model.layers.0.self_attn.q_proj"].nvfp4
    # reference: decode each nibble with a plain loop over the value table
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    packed = q.packed.tolist()
    scales = q.block_scale.float().tolist()
    g = q.global_decode_scale.item()
    ref = torch.empty(32, 32, dtype=torch.float64)
    for r in range(32):
        for c in range(32):
            byte = packed[r][c // 2]
            code = (byte >> 4) if c % 2 else (byte & 0xF)
            v = table[code & 7] * (-1 if code & 8 else 1)
            ref[r, c] = v * torch.tensor(scales[r][c // 16], dtype=torch.float32).mul(torch.tensor(g, dtype=torch.float32)).double()
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], ref.float().bfloat16())
    assert sd["model.layers.0.self_attn.o_proj.bias"].dtype == torch.bfloat16
    assert torch.equal(sd["lm_head.weight"], m.tensors["lm_head.weight"])


@settings(max_examples=15)
@given(
    n=st.integers(1, 5).map(lambda x: 16 * x),
    k=st.integers(1, 6).map(lambda x: 16 * x),
    scale=st.floats(1e-3, 1e3),
    amax=st.one_of(st.none(), st.floats(1e-4, 1e4)),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(tmp_path_factory, n, k, scale, amax, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    lw = QuantizedLinearWeight("nvfp4", (n, k), nvfp4=quantize_parts(w), input_amax=amax)
    m = QuantizedModel(linears={"model.layers.0.mlp.down_proj": lw}, config={"model_type": "x"})
    out = save_quantized(m, tmp_path_factory.mktemp("p") / "q", fmt)
    back = load_quantized(out).linears["model.layers.0.mlp.down_proj"]
    assert_same_linear(lw, back)
    if amax is not None:
        assert back.input_amax == pytest.approx(amax, rel=2**-22)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_tensors_and_zero_weight(tmp_path, fmt):
    """Tensors sharing memory (tied embeddings) are written as copies; an all-zero Linear (global
    decode scale 0, as modelopt exports amax 0) round-trips to zeros."""
    emb = torch.randn(50, 32)
    zero = QuantizedLinearWeight("nvfp4", (16, 32), nvfp4=quantize_parts(torch.zeros(16, 32)))
    zero_mo = QuantizedLinearWeight(
        "nvfp4", (16, 32),
        nvfp4=type(zero.nvfp4)(zero.nvfp4.packed, zero.nvfp4.block_scale, torch.zeros(())),
    )
    m = QuantizedModel(
        linears={"model.layers.0.mlp.down_proj": zero, "model.layers.0.mlp.o_proj": zero_mo},
        tensors={"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": emb[0]},
        config={"tie_word_embeddings": True},
    )
    back = load_quantized(save_quantized(m, tmp_path / "q", fmt))
    assert torch.equal(back.tensors["lm_head.weight"], emb) and torch.equal(back.tensors["model.norm.weight"], emb[0])
    for n in m.linears:
        assert torch.equal(dequantize_linear(back.linears[n], torch.float32), torch.zeros(16, 32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_summary_names_every_scheme_including_weight_only_fp8(tmp_path, fmt):
    """summarize_checkpoint reads each Linear's scheme from headers alone: W4A4 and W4A16 NVFP4,
    W8A8 FP8 and weight-only FP8 (no input scale)."""
    from nvfp4kit.checkpoint import summarize_checkpoint

    m = QuantizedModel(config={"model_type": "llama", "hidden_size": 32})
    m.linears["a"] = nvfp4_linear(32, 32, 1, input_amax=2.0)
    m.linears["b"] = nvfp4_linear(32, 32, 2, input_amax=None)
    m.linears["c"] = fp8_linear(32, 32, 3, input_amax=2.0)
    m.linears["d"] = fp8_linear(32, 32, 4, input_amax=None)
    want = {"a": "nvfp4", "b": "nvfp4-w4a16", "c": "fp8", "d": "fp8-w8a16"}
    if fmt == "modelopt":  # modelopt's FP8 loaders always apply a static input scale: weight-only FP8 is refused
        with pytest.raises(CheckpointError, match=r"d\.input_scale is missing"):
            save_quantized(m, tmp_path / "s", format=fmt)
        assert not (tmp_path / "s").exists()
        del m.linears["d"], want["d"]
    save_quantized(m, tmp_path / "s", format=fmt)
    s = summarize_checkpoint(tmp_path / "s")
    assert {n: v[0] for n, v in s.linears.items()} == want
    assert all(v[1] == (32, 32) for v in s.linears.values())
