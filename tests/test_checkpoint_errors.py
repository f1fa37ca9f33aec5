"""Bad input: every failure is a CheckpointError naming the file / tensor / option, and nothing is
written over."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4kit.checkpoint import (
    CheckpointError,
    QuantizedLinearWeight,
    QuantizedModel,
    convert_checkpoint,
    load_quantized,
    save_quantized,
)
from nvfp4kit.formats.nvfp4 import quantize_parts

Q = "model.layers.0.mlp.down_proj"


def good_checkpoint(path, fmt="modelopt"):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    m = QuantizedModel(
        linears={Q: QuantizedLinearWeight("nvfp4", (32, 64), nvfp4=quantize_parts(w), input_amax=1.0)},
        tensors={"model.norm.weight": torch.ones(64)},
        config={"model_type": "llama"},
    )
    return save_quantized(m, path, fmt)


def rewrite(path, edit):
    """Apply ``edit(dict) -> dict`` to the tensors of ``path/model.safetensors``."""
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    save_file(edit(tensors), str(f), metadata={"format": "pt"})


def edit_config(path, fname, edit):
    data = json.loads((path / fname).read_text())
    edit(data)
    (path / fname).write_text(json.dumps(data))


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nope")


def test_pickle_only_dir_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_quantized(tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    ck = good_checkpoint(tmp_path / "a")
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        load_quantized(ck)
    f.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(ck)
    f.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(ck)


def test_sharded_index_problems(tmp_path):
    ck = tmp_path / "a"
    w = torch.randn(32, 64)
    m = QuantizedModel(linears={f"m.l{i}": QuantizedLinearWeight("nvfp4", (32, 64), nvfp4=quantize_parts(w))
                                for i in range(4)}, config={})
    save_quantized(m, ck, max_shard_size=1500)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (ck / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard.*{shard}"):
        load_quantized(ck)
    shutil.rmtree(ck)
    save_quantized(m, ck, max_shard_size=1500)
    index["weight_map"]["m.l9.weight"] = sorted(set(index["weight_map"].values()))[0]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not found in the named shard.*m\.l9\.weight"):
        load_quantized(ck)
    (ck / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(ck)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {**t, f"{Q}.weight_scale": t[f"{Q}.weight_scale"].float()},
         rf"tensor '{Q}\.weight_scale' in .*model\.safetensors has dtype F32, expected F8_E4M3"),
        (lambda t: {**t, f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :2].contiguous()},
         rf"'{Q}\.weight_scale' .* has shape \[32, 2\], expected \[32, 4\]"),
        (lambda t: {**t, f"{Q}.weight": t[f"{Q}.weight"][:, :12].contiguous(),
                    f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :1].contiguous()},
         "K=24 is not a multiple of 16"),
        (lambda t: {k: v for k, v in t.items() if k != f"{Q}.weight_scale_2"},
         rf"tensor '{Q}\.weight_scale_2' is missing"),
        (lambda t: {**t, f"{Q}.weight_scale_2": torch.tensor([1.0, 2.0])},
         r"weight_scale_2' .* must be a float32 scalar"),
        (lambda t: {**t, f"{Q}.input_scale": torch.tensor(float("nan"))},
         r"input_scale' .* must be finite"),
        (lambda t: {**t, f"{Q}.pre_quant_scale": torch.ones(64)},
         r"pre_quant_scale.*unsupported tensor of a quantized Linear"),
        (lambda t: {**t, f"{Q}.weight": t[f"{Q}.weight"].to(torch.int8)},
         r"has dtype I8 but .*weight_scale marks it quantized"),
    ],
)
def test_modelopt_bad_tensors(tmp_path, edit, message):
    ck = good_checkpoint(tmp_path / "a")
    rewrite(ck, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(ck)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q["quantization"].update(quant_algo="INT4_AWQ"), "quant_algo 'INT4_AWQ' is not supported"),
        (lambda q: q["quantization"].update(quant_algo="FP8"), "is packed NVFP4 .* config says FP8"),
        (lambda q: q["quantization"].update(quant_algo="MIXED_PRECISION"), "needs a 'quantized_layers'"),
        (lambda q: q["quantization"].update(quant_algo="MIXED_PRECISION", quantized_layers={}),
         f"{Q} is quantized but missing from quantized_layers"),
        (lambda q: q["quantization"].update(group_size=32), "group_size 32 is not supported"),
        (lambda q: q["quantization"].update(kv_cache_quant_algo="INT8"), "kv_cache_quant_algo 'INT8'"),
    ],
)
def test_modelopt_bad_config(tmp_path, edit, message):
    ck = good_checkpoint(tmp_path / "a")
    edit_config(ck, "hf_quant_config.json", edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(ck)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {**t, f"{Q}.weight_global_scale": torch.zeros(1)}, "weight_global_scale.* is 0"),
        (lambda t: {**t, f"{Q}.weight_packed": t[f"{Q}.weight_packed"].to(torch.int16)},
         r"weight_packed' .* has dtype I16, expected U8"),
        (lambda t: {**t, f"{Q}.weight_global_scale": torch.ones(2)}, "must hold one float32 value"),
    ],
)
def test_compressed_tensors_bad_tensors(tmp_path, edit, message):
    ck = good_checkpoint(tmp_path / "a", "compressed-tensors")
    rewrite(ck, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(ck)


def test_compressed_tensors_bad_config(tmp_path):
    ck = good_checkpoint(tmp_path / "a", "compressed-tensors")
    edit_config(ck, "config.json", lambda c: c["quantization_config"].update(format="pack-quantized"))
    with pytest.raises(CheckpointError, match="format 'pack-quantized' is not supported"):
        load_quantized(ck)
    edit_config(ck, "config.json", lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported"):
        load_quantized(ck)


def test_writer_options_checked_before_writing(tmp_path):
    ck = good_checkpoint(tmp_path / "a")
    m = load_quantized(ck)
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'gguf'"):
        save_quantized(m, tmp_path / "b", "gguf")
    with pytest.raises(CheckpointError, match="shard size"):
        save_quantized(m, tmp_path / "b", max_shard_size="lots")
    with pytest.raises(CheckpointError, match="parent directory"):
        save_quantized(m, tmp_path / "missing" / "b")
    with pytest.raises(CheckpointError, match=f"{ck} is the source {ck}"):
        save_quantized(m, ck, overwrite=True)  # source_dir of a loaded model is the checkpoint itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert load_quantized(ck).linears.keys() == m.linears.keys()


def test_conversion_failure_keeps_existing_output(tmp_path):
    ck = good_checkpoint(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    rewrite(ck, lambda t: {**t, f"{Q}.weight_scale": t[f"{Q}.weight_scale"].float()})
    with pytest.raises(CheckpointError, match="expected F8_E4M3"):
        convert_checkpoint(ck, out, to="compressed-tensors", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]
