"""Released-style checkpoints written by hand (independently of nvfp4kit's writers) load with the
right values: modelopt FP8 with an FP8 KV cache and no quantization_config in config.json,
modelopt MIXED_PRECISION (NVFP4 + FP8), and compressed-tensors nvfp4-pack-quantized."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from nvfp4kit.checkpoint import dequantize_linear, dequantized_state_dict, detect_format, load_quantized

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_SCALES = (0.125, 0.5, 1.0, 1.5, 2.0, 6.0, 10.0, 448.0)  # exactly representable block scales


def hand_nvfp4(n: int, k: int, seed: int):
    """Random codes and block scales -> (packed U8, scale F8_E4M3, expected values as float64 list)."""
    rng = random.Random(seed)
    codes = [[rng.randrange(16) for _ in range(k)] for _ in range(n)]
    scales = [[rng.choice(E4M3_SCALES) for _ in range(k // 16)] for _ in range(n)]
    packed = torch.tensor([[codes[r][2 * i] | (codes[r][2 * i + 1] << 4) for i in range(k // 2)] for r in range(n)],
                          dtype=torch.uint8)
    scale = torch.tensor(scales, dtype=torch.float32).to(torch.float8_e4m3fn)
    values = [[E2M1[c & 7] * (-1 if c & 8 else 1) * scales[r][j // 16] for j, c in enumerate(row)]
              for r, row in enumerate(codes)]
    return packed, scale, values


def write(path, tensors, hf_quant=None, config=None):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if hf_quant is not None:
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))


def test_modelopt_fp8_release_style(tmp_path):
    a = "model.layers.0.self_attn"
    w = torch.tensor([[1.0, -2.0, 448.0, 0.0078125] * 4] * 16).to(torch.float8_e4m3fn)
    t = {
        f"{a}.q_proj.weight": w,
        f"{a}.q_proj.weight_scale": torch.tensor(0.25),
        f"{a}.q_proj.input_scale": torch.tensor(0.5),
        f"{a}.k_proj.weight": w.clone(),
        f"{a}.k_proj.weight_scale": torch.tensor(0.25),
        f"{a}.k_proj.input_scale": torch.tensor(0.5),
        f"{a}.k_proj.k_scale": torch.tensor(0.03125),
        f"{a}.v_proj.v_scale": torch.tensor(0.0625),
        "lm_head.weight": torch.randn(8, 16).bfloat16(),
    }
    hf_quant = {"producer": {"name": "modelopt", "version": "0.15.0"},
                "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
    write(tmp_path / "fp8", t, hf_quant)
    info = detect_format(tmp_path / "fp8")
    assert (info.format, info.scheme, info.kv_cache_format) == ("modelopt", "FP8", "fp8")
    qm = load_quantized(tmp_path / "fp8")
    assert sorted(qm.linears) == [f"{a}.k_proj", f"{a}.q_proj"]
    q = qm.linears[f"{a}.q_proj"]
    assert q.format == "fp8" and q.input_amax == 0.5 * 448
    assert torch.equal(dequantize_linear(q, torch.float32), w.float() * 0.25)
    assert qm.kv_cache_amax[a] == (0.03125 * 448, 0.0625 * 448)
    assert set(qm.tensors) == {"lm_head.weight"}


def test_modelopt_mixed_precision_release_style(tmp_path):
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    packed, scale, values = hand_nvfp4(16, 64, seed=1)
    t = {
        f"{up}.weight": packed, f"{up}.weight_scale": scale,
        f"{up}.weight_scale_2": torch.tensor(0.0078125), f"{up}.input_scale": torch.tensor(0.25),
        f"{down}.weight": torch.ones(64, 16).to(torch.float8_e4m3fn), f"{down}.weight_scale": torch.tensor(2.0),
        f"{down}.input_scale": torch.tensor(1.0),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 64),
    }
    hf_quant = {"producer": {"name": "modelopt", "version": "0.31.0"},
                "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                                 "exclude_modules": ["*.mlp.gate"],
                                 "quantized_layers": {up: {"quant_algo": "NVFP4", "group_size": 16},
                                                      down: {"quant_algo": "FP8"}}}}
    write(tmp_path / "mixed", t, hf_quant)
    qm = load_quantized(tmp_path / "mixed")
    assert qm.linears[up].format == "nvfp4" and qm.linears[down].format == "fp8"
    assert qm.linears[up].input_amax == 0.25 * 2688
    expect = torch.tensor(values, dtype=torch.float64) * 0.0078125  # all exact in float32
    assert torch.equal(dequantize_linear(qm.linears[up], torch.float32), expect.float())
    sd = dequantized_state_dict(qm, torch.bfloat16)
    assert torch.equal(sd[f"{down}.weight"], torch.full((64, 16), 2.0, dtype=torch.bfloat16))
    assert sd["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    assert qm.exclude_modules == ["*.mlp.gate"]


def test_modelopt_config_json_only(tmp_path):
    """Some exports carry the facts only in config.json's quantization_config."""
    m = "model.layers.0.mlp.down_proj"
    packed, scale, values = hand_nvfp4(16, 32, seed=2)
    t = {f"{m}.weight": packed, f"{m}.weight_scale": scale, f"{m}.weight_scale_2": torch.tensor(0.5)}
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16}}}}}
    write(tmp_path / "c", t, None, config)
    qm = load_quantized(tmp_path / "c")
    assert qm.exclude_modules == ["lm_head"] and "quantization_config" not in qm.config
    assert torch.equal(dequantize_linear(qm.linears[m], torch.float64), torch.tensor(values, dtype=torch.float64) * 0.5)


@pytest.mark.parametrize("input_global", [None, 448.0])
def test_compressed_tensors_release_style(tmp_path, input_global):
    m = "model.layers.0.self_attn.o_proj"
    packed, scale, values = hand_nvfp4(32, 48, seed=3)
    t = {f"{m}.weight_packed": packed, f"{m}.weight_scale": scale, f"{m}.weight_global_scale": torch.tensor([4.0])}
    if input_global is not None:
        t[f"{m}.input_global_scale"] = torch.tensor([input_global])
    args = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
            "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                      "input_activations": None if input_global is None else {**args, "dynamic": "local"}}},
        "ignore": ["lm_head", "re:.*mlp\\.gate$"]}}
    write(tmp_path / "ct", t, None, config)
    qm = load_quantized(tmp_path / "ct")
    lw = qm.linears[m]
    assert float(lw.nvfp4.global_decode_scale) == 0.25  # encode 4 -> decode 1/4
    assert lw.input_amax == (None if input_global is None else 2688 / 448.0)
    assert torch.equal(dequantize_linear(lw, torch.float64), torch.tensor(values, dtype=torch.float64) * 0.25)
    assert qm.exclude_modules == ["lm_head", "re:.*mlp\\.gate$"]


def test_summarize_from_headers(tmp_path):
    from nvfp4kit.checkpoint import summarize_checkpoint

    a = "model.layers.0.self_attn"
    packed, scale, _ = hand_nvfp4(16, 32, seed=4)
    t = {f"{a}.q_proj.weight": packed, f"{a}.q_proj.weight_scale": scale, f"{a}.q_proj.weight_scale_2": torch.tensor(1.0),
         f"{a}.q_proj.input_scale": torch.tensor(1.0),
         f"{a}.o_proj.weight": torch.ones(16, 32).to(torch.float8_e4m3fn), f"{a}.o_proj.weight_scale": torch.tensor(1.0),
         "lm_head.weight": torch.ones(8, 32, dtype=torch.bfloat16)}
    hf_quant = {"producer": {"name": "modelopt", "version": "0.31.0"},
                "quantization": {"quant_algo": "MIXED_PRECISION", "exclude_modules": ["lm_head"],
                                 "quantized_layers": {f"{a}.q_proj": {"quant_algo": "NVFP4", "group_size": 16},
                                                      f"{a}.o_proj": {"quant_algo": "FP8"}}}}
    write(tmp_path / "s", t, hf_quant)
    s = summarize_checkpoint(tmp_path / "s")
    assert s.linears == {f"{a}.q_proj": ("nvfp4", (16, 32)), f"{a}.o_proj": ("fp8-w8a16", (16, 32))}
    assert (s.tensors, s.files) == (7, 1)
    assert s.bytes_by_dtype == {"U8": 16 * 16, "F8_E4M3": 16 * 2 + 16 * 32, "F32": 3 * 4, "BF16": 8 * 32 * 2}
