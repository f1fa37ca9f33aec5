"""``nvfp4kit convert``: quantize (streaming), convert, dequantize, and clear errors."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nvfp4kit.checkpoint import detect_format, load_quantized
from nvfp4kit.cli.main import app

runner = CliRunner()


def text(output: str) -> str:
    """The output with rich's box drawing removed and whitespace collapsed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def source(path):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    t = {f"model.layers.0.self_attn.{n}.weight": torch.randn(32, 32, generator=g).bfloat16()
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    t["model.embed_tokens.weight"] = torch.randn(64, 32, generator=g).bfloat16()
    t["lm_head.weight"] = torch.randn(64, 32, generator=g).bfloat16()
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer_config.json").write_text("{}")
    return t


def test_cli_quantize_convert_dequantize(tmp_path):
    src = tmp_path / "src"
    t = source(src)
    r = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "q"), "--quantize", "nvfp4",
                            "--exclude", "*.o_proj"])
    assert r.exit_code == 0, r.output
    assert "model.safetensors" in r.output
    qm = load_quantized(tmp_path / "q")
    assert sorted(qm.linears) == [f"model.layers.0.self_attn.{n}" for n in ("k_proj", "q_proj", "v_proj")]
    assert torch.equal(qm.tensors["model.layers.0.self_attn.o_proj.weight"], t["model.layers.0.self_attn.o_proj.weight"])
    # the checkpoint lists the modules kept in high precision by name
    assert "model.layers.0.self_attn.o_proj" in detect_format(tmp_path / "q").exclude_modules

    r = runner.invoke(app, ["convert", str(tmp_path / "q"), "--out", str(tmp_path / "ct"), "--to", "compressed-tensors"])
    assert r.exit_code == 0, r.output
    assert detect_format(tmp_path / "ct").scheme == "nvfp4-pack-quantized"

    r = runner.invoke(app, ["convert", str(tmp_path / "ct"), "--out", str(tmp_path / "bf"), "--to", "bf16"])
    assert r.exit_code == 0, r.output
    assert detect_format(tmp_path / "bf").format == "unquantized"
    assert (tmp_path / "bf" / "tokenizer_config.json").exists()


def test_cli_errors(tmp_path):
    src = tmp_path / "src"
    source(src)
    cases = [
        (["convert", str(src), "--out", str(tmp_path / "o"), "--quantize", "nvfp4", "-x", "zzz*"], "match no Linear"),
        (["convert", str(src), "--out", str(tmp_path / "o"), "--to", "modelopt"], "not a quantized checkpoint"),
        (["convert", str(src), "--out", str(tmp_path / "o"), "--quantize", "nvfp4", "--to", "bf16"], "--to must be"),
        (["convert", str(src), "--out", str(src), "--quantize", "nvfp4", "--overwrite"], "is the source"),
        (["convert", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--quantize", "nvfp4"], "does not exist"),
        (["convert", str(src), "--out", str(tmp_path / "o"), "--to", "modelopt", "-x", "a"], "only with --quantize"),
        (["convert", str(src), "--out", str(tmp_path / "o"), "--quantize", "int3"], "scheme must be"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code != 0, args
        assert message in text(r.output), (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "o").mkdir()
    r = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "o"), "--quantize", "nvfp4"])
    assert r.exit_code != 0 and "already exists" in text(r.output)
    assert list((tmp_path / "o").iterdir()) == []
