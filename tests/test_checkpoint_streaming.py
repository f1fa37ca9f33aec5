"""Streaming weight-only quantization of sharded checkpoints, and format conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4kit.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    dequantize_linear,
    detect_format,
    load_quantized,
    quantize_checkpoint,
)
from nvfp4kit.checkpoint import streaming
from nvfp4kit.formats.nvfp4 import quantize_parts as reference_quantize_parts

LAYER = {
    "self_attn.q_proj": (64, 32),
    "self_attn.k_proj": (32, 32),
    "self_attn.v_proj": (32, 32),
    "self_attn.o_proj": (32, 64),
    "mlp.gate_proj": (96, 32),
    "mlp.up_proj": (96, 32),
    "mlp.down_proj": (32, 96),
}


def make_checkpoint(path, layers=3, shards=3, dtype=torch.bfloat16, seed=0, extra=None):
    """A sharded HF-style Llama checkpoint with an index, config and tokenizer files."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(100, 32, generator=g).to(dtype)}
    for i in range(layers):
        for n, shape in LAYER.items():
            tensors[f"model.layers.{i}.{n}.weight"] = (torch.randn(*shape, generator=g) * (i + 1)).to(dtype)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(32, dtype=dtype)
        tensors[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.randn(64, generator=g).to(dtype)
    tensors["model.norm.weight"] = torch.ones(32, dtype=dtype)
    tensors["lm_head.weight"] = torch.randn(100, 32, generator=g).to(dtype)
    tensors.update(extra or {})
    path.mkdir(parents=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (path / "tokenizer.json").write_text("{}")
    return tensors


def test_streaming_nvfp4_matches_whole_tensor_reference(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tensors = make_checkpoint(src)
    monkeypatch.setattr(streaming, "MAX_CHUNK_ELEMENTS", 16 * 32)  # several row chunks per tensor
    monkeypatch.setattr(streaming, "MIN_CHUNK_ELEMENTS", 16 * 32)
    out = quantize_checkpoint(src, tmp_path / "q", "nvfp4", exclude=["model.layers.0.mlp.*"], backend="torch")
    qm = load_quantized(out)
    info = detect_format(out)
    assert (info.format, info.scheme) == ("modelopt", "W4A16_NVFP4")
    # the modules kept in high precision, by name (the same list in-memory PTQ writes)
    assert info.exclude_modules == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj",
                                    "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    quantized = {f"model.layers.{i}.{n}" for i in range(3) for n in LAYER} - {
        f"model.layers.0.{n}" for n in LAYER if n.startswith("mlp.")
    }
    assert set(qm.linears) == quantized
    for i in range(3):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            names = [f"model.layers.{i}.{'self_attn' if len(group) == 3 else 'mlp'}.{n}" for n in group]
            if names[0] not in qm.linears:
                continue
            amax = max(float(tensors[f"{n}.weight"].float().abs().max()) for n in names)
            for n in names:
                ref = reference_quantize_parts(tensors[f"{n}.weight"], global_amax=amax)
                got = qm.linears[n].nvfp4
                assert torch.equal(got.packed, ref.packed), n
                assert torch.equal(got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8)), n
                assert torch.equal(got.global_decode_scale, ref.global_decode_scale), n
                assert qm.linears[n].input_amax is None
    o = "model.layers.1.self_attn.o_proj"
    ref = reference_quantize_parts(tensors[f"{o}.weight"])
    assert torch.equal(qm.linears[o].nvfp4.packed, ref.packed)
    # copied unchanged: excluded Linears, embeddings, norms, biases
    for n in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
              "model.norm.weight"):
        assert torch.equal(qm.tensors[n], tensors[n]), n
    assert torch.equal(qm.linears["model.layers.2.self_attn.q_proj"].bias, tensors["model.layers.2.self_attn.q_proj.bias"])
    assert (out / "tokenizer.json").exists()


def test_streaming_fp8(tmp_path):
    src = tmp_path / "src"
    tensors = make_checkpoint(src, layers=1, shards=2, dtype=torch.float32)
    out = quantize_checkpoint(src, tmp_path / "q", "fp8", format="compressed-tensors")
    qm = load_quantized(out)
    assert detect_format(out).scheme == "float-quantized"
    for n in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        w = tensors[f"{n}.weight"].double()
        group = [n] if "down" in n else [n.replace("k_proj", x) for x in ("q_proj", "k_proj", "v_proj")]
        amax = max(float(tensors[f"{m}.weight"].abs().max()) for m in group)
        scale = torch.tensor(amax / 448.0, dtype=torch.float32)  # f32(amax) / 448 in f32 == rounded quotient
        lw = qm.linears[n]
        assert lw.fp8_weight_scale.item() == scale.item()
        ref = (w / scale.double()).clamp(-448, 448).float().to(torch.float8_e4m3fn)
        assert torch.equal(lw.fp8_weight.view(torch.uint8), ref.view(torch.uint8))
        assert torch.allclose(dequantize_linear(lw, torch.float32), tensors[f"{n}.weight"], rtol=0.07, atol=amax / 448 * 2**-9)


def test_streaming_output_is_sharded(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(src, layers=4, shards=4)
    out = quantize_checkpoint(src, tmp_path / "q", "nvfp4", max_shard_size=6000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(set(index["weight_map"].values()))
    assert n > 2
    for f in set(index["weight_map"].values()):
        assert os.path.getsize(out / f) < 6000 + 4096  # header + one tensor of slack at most
    assert len(load_quantized(out).linears) == 4 * len(LAYER)


def test_streaming_bad_input_writes_nothing(tmp_path):
    src = tmp_path / "src"
    odd = torch.randn(16, 24).bfloat16()
    make_checkpoint(src, layers=1, shards=1, extra={"model.layers.0.odd.weight": odd})
    with pytest.raises(CheckpointError, match=r"\['nope\*'\] match no Linear"):
        quantize_checkpoint(src, tmp_path / "q", exclude=["model.layers.0.odd", "nope*"])
    with pytest.raises(CheckpointError, match="scheme"):
        quantize_checkpoint(src, tmp_path / "q", "int4", exclude=["model.layers.0.odd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # K not a multiple of 16: kept in high precision (as in-memory PTQ does), copied bit for bit
    out = quantize_checkpoint(src, tmp_path / "q")
    qm = load_quantized(out)
    assert "model.layers.0.odd" not in qm.linears and torch.equal(qm.tensors["model.layers.0.odd.weight"], odd)
    assert "model.layers.0.odd" in detect_format(out).exclude_modules
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "q2")


def test_streaming_nan_weight_names_tensor(tmp_path):
    src = tmp_path / "src"
    bad = torch.randn(32, 32)
    bad[3, 5] = float("nan")
    make_checkpoint(src, layers=1, shards=2, extra={"model.layers.0.extra_proj.weight": bad.bfloat16()})
    with pytest.raises(CheckpointError, match=r"extra_proj\.weight.*NaN"):
        quantize_checkpoint(src, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("first", ["modelopt", "compressed-tensors"])
def test_convert_exact_and_dequantize(tmp_path, first):
    src = tmp_path / "src"
    make_checkpoint(src, layers=2, shards=2)
    a = quantize_checkpoint(src, tmp_path / "a", "nvfp4", format=first)
    second = "compressed-tensors" if first == "modelopt" else "modelopt"
    b = convert_checkpoint(a, tmp_path / "b", to=second)
    assert detect_format(b).format == second
    qa, qb = load_quantized(a), load_quantized(b)
    assert set(qa.linears) == set(qb.linears) and set(qa.tensors) == set(qb.tensors)
    for m, la in qa.linears.items():
        lb = qb.linears[m]
        assert torch.equal(la.nvfp4.packed, lb.nvfp4.packed)
        assert torch.equal(la.nvfp4.block_scale.view(torch.uint8), lb.nvfp4.block_scale.view(torch.uint8))
        # one side stores the decode scale, the other its float32 reciprocal
        enc = lb.nvfp4.global_decode_scale if first == "compressed-tensors" else la.nvfp4.global_decode_scale
        with safe_open(str((a if first == "compressed-tensors" else b) / "model.safetensors"), "pt") as f:
            stored_encode = f.get_tensor(f"{m}.weight_global_scale")
        assert stored_encode.item() == (1 / enc.float()).item() or enc.item() == (1 / stored_encode).item()
    assert detect_format(b).exclude_modules == detect_format(a).exclude_modules
    c = convert_checkpoint(b, tmp_path / "c", to="bf16")
    info = detect_format(c)
    assert info.format == "unquantized" and info.config["dtype"] == "bfloat16"
    deq = load_quantized(c)
    for m, lb in qb.linears.items():
        assert torch.equal(deq.tensors[f"{m}.weight"], dequantize_linear(lb, torch.bfloat16))
    assert (c / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        convert_checkpoint(c, tmp_path / "d", to="modelopt")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(a, b, to=second)
    with pytest.raises(CheckpointError, match="is the source"):
        convert_checkpoint(a, a, to=second, overwrite=True)


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from nvfp4kit.checkpoint import quantize_checkpoint

    def hwm():  # peak RSS of this process image in bytes (ru_maxrss would include the parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    src, out = sys.argv[1], sys.argv[2]
    base = hwm()
    quantize_checkpoint(src, out, "nvfp4", backend="torch")
    print(hwm() - base, base)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_streaming_peak_memory_about_one_shard(tmp_path):
    """16 shards of 8 MiB of bf16 weights (128 MiB): the quantizer's extra peak RSS is one output
    shard, one source tensor and a small constant working set, far below the checkpoint size
    (measured ~40 MiB here; loading the whole checkpoint would take 128 MiB before any work)."""
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for s in range(16):
        fname = f"model-{s + 1:05d}-of-00016.safetensors"
        part = {f"model.layers.{s}.mlp.{n}.weight": torch.randn(1024, 1024, generator=g).bfloat16()
                for n in ("up_proj", "down_proj", "o_proj", "x_proj")}
        save_file(part, str(src / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text("{}")
    shard = 8 * 2**20
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    extra, base = (int(x) for x in res.stdout.strip().splitlines()[-1].split())
    assert base > 50 * 2**20  # a real measurement (torch is imported)
    assert extra < 8 * shard, f"peak RSS grew by {extra / 2**20:.1f} MiB for 8 MiB shards"
    assert len(load_quantized(tmp_path / "q").linears) == 64


def test_streaming_value_beyond_float32_names_tensor(tmp_path):
    src = tmp_path / "src"
    huge = torch.ones(16, 32, dtype=torch.float64)
    huge[1, 2] = 1e300
    make_checkpoint(src, layers=1, shards=1, dtype=torch.float32, extra={"model.layers.0.big_proj.weight": huge})
    with pytest.raises(CheckpointError, match=r"cannot quantize tensor 'model\.layers\.0\.big_proj\.weight' in .*float32 range"):
        quantize_checkpoint(src, tmp_path / "q", backend="torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
