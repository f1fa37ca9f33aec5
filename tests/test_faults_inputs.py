"""Bad input and faults (issue 15, items 4-7 and 9): a truncated source, pickle weights, a quantized
checkpoint whose config markers were removed, a read-only or full output location, corrupt values.
Every case is one clear error naming the file / tensor (the same for every command), found before any
work, with nothing written; a perplexity that is not finite is reported with its cause."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from nvfp4kit.checkpoint import CheckpointError, CheckpointReader, detect_format
from nvfp4kit.cli.main import app

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n") * 30
FOX = "model.layers.0.mlp.down_proj"


def text(output: str) -> str:
    """CLI output without rich's box drawing, whitespace collapsed (messages wrap in panels)."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "src"
    tiny_llama(vocab=128, max_positions=128).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d.parent / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def quantized(source):
    """A W4A16 modelopt checkpoint of ``source`` and its compressed-tensors twin."""
    from nvfp4kit.checkpoint import convert_checkpoint
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    out = source.parent / "q"
    run_quantize(QuantizeJob(model=str(source), out=str(out), scheme="w4a16", weight_scale="max", load="whole"))
    convert_checkpoint(out, source.parent / "q-ct", to="compressed-tensors")
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(dict) -> None`` to the tensors of ``path/model.safetensors`` (bypassing every writer)."""
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def truncate(path: Path, cut: int = 300) -> None:
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - cut])


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def invoke(*args: str):
    """Run the CLI with a wide terminal, so messages and paths are not wrapped."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "2000"})


def commands_reading(model: Path, work: Path, calib: Path):
    """Every command that reads ``model`` as a source, each with an output under ``work``."""
    q = ["--calib", calib, "--calib-samples", "2", "--seq-len", "32"]
    return {
        "quantize whole": ["quantize", "--model", model, "--out", work / "o1", "--load", "whole", *q],
        "quantize blocks": ["quantize", "--model", model, "--out", work / "o2", "--load", "blocks", *q],
        "quantize auto": ["quantize", "--model", model, "--out", work / "o3", *q],
        "quantize streaming": ["quantize", "--model", model, "--out", work / "o4", "--scheme", "w4a16",
                               "--weight-scale", "max", "--weights-only-streaming"],
        "convert --quantize": ["convert", model, "--out", work / "o5", "--quantize", "nvfp4"],
        "qat": ["qat", "--model", model, "--out", work / "o6", "--data", calib, "--steps", "1", "--seq-len", "32",
                "--eval-tokens", "0", "--scheme", "w4a16"],
        "eval": ["eval", "--model", model, "--text", calib, "--seq-len", "32", "--max-tokens", "64"],
    }


# ----------------------------------------------------------------------------- 4. truncated files


def test_a_truncated_source_gets_one_message_from_every_command(source, tmp_path):
    bad = copy(source, tmp_path / "bad")
    truncate(bad)
    work = tmp_path / "work"
    work.mkdir()
    expected = f"safetensors file {bad / 'model.safetensors'} is corrupt or truncated"
    for what, args in commands_reading(bad, work, source.parent / "calib.txt").items():
        r = invoke(*args)
        assert r.exit_code == 2, (what, r.output)
        assert expected in text(r.output), (what, r.output)
        assert "Traceback" not in r.output
    assert listing(work) == []  # nothing written, not even a staging folder


def test_a_truncated_quantized_checkpoint_gets_the_same_message(source, quantized, tmp_path):
    bad = copy(quantized, tmp_path / "bad-q")
    truncate(bad, 50)
    expected = f"safetensors file {bad / 'model.safetensors'} is corrupt or truncated"
    calib = source.parent / "calib.txt"
    for args in (["eval", "--model", bad, "--text", calib, "--seq-len", "32"], ["inspect", bad],
                 ["convert", bad, "--out", tmp_path / "c1", "--to", "bf16"],
                 ["convert", bad, "--out", tmp_path / "c2", "--to", "compressed-tensors"],
                 ["eval", "--model", source, "--against", bad, "--text", calib, "--seq-len", "32"],
                 ["qat", "--model", source, "--out", tmp_path / "c3", "--data", calib, "--steps", "1",
                  "--seq-len", "32", "--eval-tokens", "0", "--ptq", bad]):
        r = invoke(*args)
        assert r.exit_code == 2 and expected in text(r.output), (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-q"]


def test_a_truncated_shard_of_a_sharded_source_is_named(source, tmp_path):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(source).save_pretrained(sharded, max_shard_size="100KB")
    char_tokenizer().save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[:-100])
    r = invoke("quantize", "--model", sharded, "--out", tmp_path / "o", "--scheme", "w4a16", "--weight-scale", "max",
               "--load", "whole")
    assert r.exit_code == 2
    assert f"safetensors file {shards[-1]} is corrupt or truncated" in text(r.output)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 5. pickle sources


class _Payload:
    """Unpickling this creates a folder: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickle_folder(source: Path, d: Path, name: str = "pytorch_model.bin", keep_safetensors: bool = False) -> Path:
    d.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors" or keep_safetensors:
            shutil.copy(f, d / f.name)
    (d / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(d.parent / "PWNED")}))
    return d


def test_pickle_only_sources_are_refused_with_how_to_convert_them(source, tmp_path):
    bad = pickle_folder(source, tmp_path / "pickled")
    work = tmp_path / "work"
    work.mkdir()
    for what, args in commands_reading(bad, work, source.parent / "calib.txt").items():
        r = invoke(*args)
        out = text(r.output)
        assert r.exit_code == 2, (what, r.output)
        assert f"checkpoint {bad}: the weights are in pickle files (pytorch_model.bin)" in out, (what, r.output)
        # how to convert: transformers' save_pretrained, or torch.load(weights_only=True) + safetensors
        assert "save_pretrained(" in out and "weights_only=True" in out and "st.save_file(" in out, what
    r = invoke("quantize", "--model", bad / "pytorch_model.bin", "--out", work / "x")  # the file itself
    assert r.exit_code == 2 and "the weights are in pickle files (pytorch_model.bin)" in text(r.output)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled
    assert listing(work) == []


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_every_pickle_suffix_is_refused_by_the_reader(source, tmp_path, suffix):
    d = pickle_folder(source, tmp_path / "p", name=f"weights{suffix}")
    with pytest.raises(CheckpointError, match=re.escape(f"pickle files (weights{suffix})")):
        CheckpointReader(d)
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        CheckpointReader(d / f"weights{suffix}")
    assert not (tmp_path / "PWNED").exists()


def test_the_conversion_the_message_gives_works(source, tmp_path):
    """The one-file snippet of the message, run as written, makes a folder every command reads."""
    import torch as _torch  # the snippet's own imports

    d = tmp_path / "plain"
    d.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    with safe_open(str(source / "model.safetensors"), "pt") as h:
        _torch.save({k: h.get_tensor(k) for k in h.keys()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d)
    snippet = re.search(r'python -c "(.*)"$', str(e.value)).group(1)
    cwd = os.getcwd()
    try:
        os.chdir(d)
        exec(snippet, {})  # noqa: S102 - the documented conversion, on a file this test wrote
    finally:
        os.chdir(cwd)
    (d / "pytorch_model.bin").unlink()
    r = invoke("eval", "--model", d, "--text", source.parent / "calib.txt", "--seq-len", "32", "--max-tokens", "64")
    ref = invoke("eval", "--model", source, "--text", source.parent / "calib.txt", "--seq-len", "32",
                 "--max-tokens", "64")
    assert r.exit_code == 0 and ref.exit_code == 0, r.output
    ppl = re.search(r"perplexity (\S+)", r.output).group(1)
    assert ppl == re.search(r"perplexity (\S+)", ref.output).group(1)


def test_a_pickle_beside_safetensors_is_never_opened(source, tmp_path):
    d = pickle_folder(source, tmp_path / "both", keep_safetensors=True)
    r = invoke("eval", "--model", d, "--text", source.parent / "calib.txt", "--seq-len", "32", "--max-tokens", "64")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- 6. markers removed


def strip_markers(ck: Path) -> None:
    (ck / "hf_quant_config.json").unlink(missing_ok=True)
    config = json.loads((ck / "config.json").read_text())
    del config["quantization_config"]
    (ck / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["q", "q-ct"])
def test_quantized_tensors_without_their_config_are_refused_by_every_command(source, quantized, tmp_path, fmt):
    bad = copy(quantized.parent / fmt, tmp_path / "stripped")
    strip_markers(bad)
    assert detect_format(quantized.parent / fmt).format != "unquantized"
    calib = source.parent / "calib.txt"
    work = tmp_path / "work"
    work.mkdir()
    packed = f"{FOX}.weight" if fmt == "q" else f"{FOX}.weight_packed"
    for args in (["convert", bad, "--out", work / "a", "--to", "bf16"],
                 ["convert", bad, "--out", work / "b", "--to", "modelopt"],
                 ["convert", bad, "--out", work / "c", "--quantize", "nvfp4"],
                 ["eval", "--model", bad, "--text", calib, "--seq-len", "32"],
                 ["inspect", bad],
                 ["quantize", "--model", bad, "--out", work / "d", "--scheme", "w4a16", "--weight-scale", "max"]):
        r = invoke(*args)
        out = text(r.output)
        assert r.exit_code == 2, (args, r.output)
        assert "are quantized weights or scales" in out and "declares a quantization" in out, (args, r.output)
    assert listing(work) == []
    from nvfp4kit.checkpoint.markers import undeclared_quantized_tensors

    with CheckpointReader(bad) as r:
        found = undeclared_quantized_tensors(r)
        first = f"{found[0]} ({r.dtype_str(found[0])} {list(r.shape(found[0]))})"
    assert packed in found and f"{FOX}.weight_scale" in found
    # the message counts the tensors and names them with their dtypes and shapes
    with pytest.raises(CheckpointError, match="restore the config files") as e:
        detect_format(bad)
    assert f"{len(found)} tensor(s) are quantized weights or scales, e.g. {first}, " in str(e.value)
    assert len(found) == 14 * (3 if fmt == "q" else 3)  # 14 Linears: packed weight, block and global scale
    assert not any(n.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight")) for n in found)


def test_what_marks_a_tensor_quantized(tmp_path):
    """By name and dtype alone: NVFP4 global scales / packed weights, a weight_scale beside a U8 or FP8
    weight, a 2-dim U8 weight; not a plain weight, a U8 buffer, or a weight_scale beside a float weight."""
    from nvfp4kit.checkpoint.markers import undeclared_quantized_tensors

    t = {
        "a.weight": torch.zeros(4, 8, dtype=torch.uint8), "a.weight_scale": torch.zeros(4, 1).to(torch.float8_e4m3fn),
        "a.weight_scale_2": torch.ones(()),
        "b.weight": torch.zeros(4, 16).to(torch.float8_e4m3fn), "b.weight_scale": torch.ones(()),
        "c.weight_packed": torch.zeros(4, 8, dtype=torch.uint8), "c.weight_global_scale": torch.ones(1),
        "c.input_global_scale": torch.ones(1),
        "d.weight": torch.zeros(4, 8, dtype=torch.uint8),
        "plain.weight": torch.ones(4, 16), "plain.weight_scale": torch.ones(4),  # a float weight's own scale
        "mask": torch.zeros(8, dtype=torch.uint8), "e.weight": torch.zeros(8, dtype=torch.uint8),
    }
    save_file(t, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as r:
        found = undeclared_quantized_tensors(r)
    assert sorted(found) == ["a.weight", "a.weight_scale", "a.weight_scale_2", "b.weight_scale", "c.input_global_scale",
                     "c.weight_global_scale", "c.weight_packed", "d.weight"]
    t["c.weight_scale"] = torch.zeros(4, 1).to(torch.float8_e4m3fn)  # compressed-tensors' block scale
    save_file(t, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as r:
        assert "c.weight_scale" in undeclared_quantized_tensors(r)


# ----------------------------------------------------------------------------- 7. output location


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder no file can be created in. Root ignores permission bits, so there the OS refusal is
    simulated where the check creates its probe file (the same ``OSError`` a read-only mount gives)."""
    import tempfile

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir).resolve() == d.resolve():
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield d
    d.chmod(0o755)


def test_a_read_only_output_is_refused_before_any_work(source, quantized, read_only, monkeypatch):
    import nvfp4kit.pipelines.models as models

    loads = []
    real = models.load_source_model
    monkeypatch.setattr(models, "load_source_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    calib = source.parent / "calib.txt"
    for args in (["quantize", "--model", source, "--out", read_only / "q", "--load", "whole", "--scheme", "w4a16",
                  "--weight-scale", "max"],
                 ["quantize", "--model", source, "--out", read_only / "deeper" / "q", "--load", "blocks",
                  "--calib", calib, "--calib-samples", "2", "--seq-len", "32"],
                 ["quantize", "--model", source, "--out", read_only / "s", "--scheme", "w4a16",
                  "--weights-only-streaming"],
                 ["convert", quantized, "--out", read_only / "c", "--to", "bf16"],
                 ["convert", quantized, "--out", read_only / "c", "--to", "compressed-tensors"],
                 ["convert", source, "--out", read_only / "c", "--quantize", "nvfp4"],
                 ["qat", "--model", source, "--out", read_only / "qat", "--data", calib, "--steps", "1",
                  "--seq-len", "32"]):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert f"cannot write in {read_only}" in text(r.output), (args, r.output)
        assert "Permission denied" in text(r.output)
    assert loads == []  # refused before the model was loaded
    assert listing(read_only) == []


def test_an_output_under_a_file_is_refused(source, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = invoke("quantize", "--model", source, "--out", tmp_path / "afile" / "q", "--scheme", "w4a16",
               "--weight-scale", "max")
    assert r.exit_code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in text(r.output)


Usage = namedtuple("Usage", "total used free")


def full_disk(monkeypatch, free: int) -> list[Path]:
    """Every file system reports ``free`` bytes free; returns the folders asked about."""
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(Path(p)) or Usage(10**12, 10**12 - free, free))
    return asked


def test_a_full_output_location_is_refused_before_calibration(source, quantized, tmp_path, monkeypatch):
    import nvfp4kit.pipelines.qat as qat
    import nvfp4kit.pipelines.quantize as qp

    def must_not_run(*a, **k):
        raise AssertionError("work started although the output cannot be written")

    monkeypatch.setattr(qp, "quantize_model", must_not_run)
    monkeypatch.setattr(qp, "_samples", must_not_run)
    monkeypatch.setattr(qat, "tokenize", must_not_run)
    asked = full_disk(monkeypatch, free=4096)
    calib = source.parent / "calib.txt"
    work = tmp_path / "work"
    work.mkdir()
    cases = {
        "quantize whole": ["quantize", "--model", source, "--out", work / "q", "--load", "whole", "--calib", calib],
        "quantize mixed": ["quantize", "--model", source, "--out", work / "q", "--load", "whole", "--scheme", "mixed",
                           "--bits-budget", "6", "--calib", calib],
        "streaming": ["quantize", "--model", source, "--out", work / "s", "--scheme", "w4a16",
                      "--weights-only-streaming"],
        "convert bf16": ["convert", quantized, "--out", work / "c", "--to", "bf16"],
        "convert ct": ["convert", quantized, "--out", work / "c", "--to", "compressed-tensors"],
        "convert --quantize": ["convert", source, "--out", work / "c", "--quantize", "nvfp4"],
        "qat": ["qat", "--model", source, "--out", work / "qat", "--data", calib, "--steps", "1", "--seq-len", "32"],
    }
    for what, args in cases.items():
        r = invoke(*args)
        out = text(r.output)
        assert r.exit_code == 2, (what, r.output)
        m = re.search(r"4\.0 KiB free on the file system of (\S+), but .* needs about ([\d.]+) (KiB|MiB)", out)
        assert m, (what, r.output)
        assert Path(m.group(1)) == work, what
        assert "training state" in out or what != "qat"
    assert work in asked
    assert listing(work) == []


def test_the_block_path_checks_free_space_with_the_same_rule(source, tmp_path, monkeypatch):
    import nvfp4kit.pipelines.quantize as qp

    monkeypatch.setattr(qp, "quantize_by_block", lambda *a, **k: pytest.fail("calibration started"))
    full_disk(monkeypatch, free=100)
    r = invoke("quantize", "--model", source, "--out", tmp_path / "q", "--load", "blocks", "--calib",
               source.parent / "calib.txt", "--calib-samples", "2", "--seq-len", "32")
    assert r.exit_code == 2
    assert "100 B free on the file system" in text(r.output) and "quantizing block by block" in text(r.output)
    assert listing(tmp_path) == []


def test_the_size_estimates_are_close_to_what_is_written(source, quantized, tmp_path):
    """The estimates the free-space checks use are the real sizes within 10% (of a tiny model, whose
    safetensors header and scalar scales weigh most): the model's shapes under the plan, the
    dequantized size from the headers."""
    from transformers import LlamaForCausalLM

    from nvfp4kit.calibrate.ptq import plan_model
    from nvfp4kit.checkpoint import convert_checkpoint
    from nvfp4kit.checkpoint.convert import dequantized_bytes
    from nvfp4kit.pipelines.quantize import estimated_output_bytes

    model = LlamaForCausalLM.from_pretrained(source)
    est = estimated_output_bytes(model, plan_model(model, "w4a16"), torch.float32)
    real = (quantized / "model.safetensors").stat().st_size
    assert 0.9 * real < est <= real
    with CheckpointReader(quantized) as r:
        est_bf16 = dequantized_bytes(r, torch.bfloat16)
    out = convert_checkpoint(quantized, tmp_path / "bf", to="bf16")
    real_bf16 = (out / "model.safetensors").stat().st_size
    assert real_bf16 * 0.9 < est_bf16 < real_bf16 * 1.1


def test_a_disk_that_fills_up_while_writing_leaves_nothing(quantized, tmp_path, monkeypatch):
    import safetensors.torch

    from nvfp4kit.checkpoint import convert_checkpoint

    def enospc(*a, **k):
        raise OSError(28, "No space left on device", a[1] if len(a) > 1 else None)

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    with pytest.raises(CheckpointError, match=r"writing .*c failed: No space left on device"):
        convert_checkpoint(quantized, tmp_path / "c", to="compressed-tensors")
    assert listing(tmp_path) == []  # no output, no partial folder


# ----------------------------------------------------------------------------- 9. corrupt values


def test_perplexity_of_astronomical_losses_is_inf_not_an_overflow():
    from nvfp4kit.evaluate.perplexity import Perplexity, ppl_from_nll

    assert ppl_from_nll(2.0) == math.exp(2.0)
    assert ppl_from_nll(710.0) == math.inf and ppl_from_nll(math.inf) == math.inf
    assert math.isnan(ppl_from_nll(math.nan))
    assert not Perplexity(math.inf, 800.0, 10).finite and Perplexity(7.0, math.log(7.0), 10).finite


def eval_output(model: Path, calib: Path):
    r = invoke("eval", "--model", model, "--text", calib, "--seq-len", "32", "--max-tokens", "64")
    return r, text(r.output)


def test_eval_reports_an_overflowing_perplexity_as_inf_with_a_warning(source, quantized, tmp_path):
    bad = copy(quantized, tmp_path / "loud")
    rewrite(bad, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] * 1e5))  # finite, absurd
    r, out = eval_output(bad, source.parent / "calib.txt")
    assert r.exit_code == 0, r.output
    nll = float(re.search(r"mean NLL ([\d.]+)", out).group(1))
    assert nll > 709.8  # exp() of it overflows a float
    assert "perplexity inf over 62 tokens" in out
    assert "warning:" in out and "no weight or scale is NaN or infinite: the logits overflowed" in out


def test_eval_names_the_tensors_behind_a_nan_perplexity(source, quantized, tmp_path):
    bad = copy(quantized, tmp_path / "nan")

    def edit(t):
        t["model.norm.weight"][3] = float("inf")
        codes = t[f"{FOX}.weight_scale"].view(torch.uint8)
        codes[0, 0] = 0x7F  # an E4M3 NaN
        codes[1, 1] = 0x80 | 0x38  # -1.0: negative
    rewrite(bad, edit)
    r, out = eval_output(bad, source.parent / "calib.txt")
    assert r.exit_code == 0, r.output
    assert "perplexity nan over 62 tokens" in out
    assert f"{FOX}.weight_scale (model.safetensors): 1 NaN and 1 negative block scale(s)" in out
    assert "model.norm.weight: 1 of 64 values are NaN or infinite" in out


def test_inspect_flags_broken_scales_and_values_per_tensor(source, quantized, tmp_path):
    r = invoke("inspect", quantized)
    assert r.exit_code == 0 and "broken values" not in r.output
    bad = copy(quantized, tmp_path / "bad")
    up, gate = "model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"

    def edit(t):
        t[f"{FOX}.weight_scale"].view(torch.uint8)[2, 0] = 0x7F  # NaN
        t[f"{up}.weight_scale"].view(torch.uint8)[0, :3] = 0xB8  # -1.0 three times
        t[f"{gate}.weight_scale_2"] = torch.zeros(())  # the weight would dequantize to zeros
        t["model.layers.0.input_layernorm.weight"][:2] = float("nan")
    rewrite(bad, edit)
    r = invoke("inspect", bad)
    assert r.exit_code == 0, r.output
    out = text(r.output)
    assert "warning: 4 tensor(s) hold broken values" in out
    assert f"{FOX}.weight_scale (model.safetensors): 1 NaN and 0 negative block scale(s)" in out
    assert f"{up}.weight_scale (model.safetensors): 0 NaN and 3 negative block scale(s)" in out
    assert f"{gate}.weight_scale_2 (model.safetensors): is 0 while block scales are not" in out
    assert "model.layers.0.input_layernorm.weight: 2 of 64 values are NaN or infinite" in out


def test_a_non_finite_global_scale_stops_inspect_listing_every_broken_scale(quantized, tmp_path):
    bad = copy(quantized, tmp_path / "bad")
    up = "model.layers.1.mlp.up_proj"

    def edit(t):
        t[f"{FOX}.weight_scale_2"] = torch.tensor(float("inf"))
        t[f"{up}.weight_scale"].view(torch.uint8)[0, 0] = 0x7F
    rewrite(bad, edit)
    r = invoke("inspect", bad)
    out = text(r.output)
    assert r.exit_code == 2
    assert f"{FOX}.weight_scale_2" in out and "must be finite and non-negative, got inf" in out
    assert f"{up}.weight_scale (model.safetensors): 1 NaN and 0 negative block scale(s)" in out


def test_convert_refuses_to_dequantize_broken_scales_and_warns_of_non_finite_values(quantized, tmp_path,
                                                                                     monkeypatch):
    from nvfp4kit import progress
    from nvfp4kit.checkpoint import convert_checkpoint

    bad = copy(quantized, tmp_path / "bad")
    rewrite(bad, lambda t: t[f"{FOX}.weight_scale"].view(torch.uint8).__setitem__((0, 0), 0x7F))
    r = invoke("convert", bad, "--out", tmp_path / "bf", "--to", "bf16")
    assert r.exit_code == 2
    assert f"1 broken scale(s), so the weights cannot be dequantized" in text(r.output)
    assert f"{FOX}.weight_scale (model.safetensors): 1 NaN" in text(r.output)
    noisy = copy(quantized, tmp_path / "noisy")
    rewrite(noisy, lambda t: t["model.norm.weight"].__setitem__(0, float("-inf")))
    logged = []
    monkeypatch.setattr(progress, "log", logged.append)
    convert_checkpoint(noisy, tmp_path / "ct", to="compressed-tensors")
    assert logged == ["warning: model.norm.weight: 1 of 64 values are NaN or infinite (copied as it is: the "
                      "checkpoint is corrupt)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ct", "noisy"]


def test_nonfinite_count_of_every_dtype():
    from nvfp4kit.checkpoint.health import nonfinite_count

    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert nonfinite_count(x) == 3 and nonfinite_count(x.bfloat16()) == 3 and nonfinite_count(x.half()) == 3
    assert nonfinite_count(x.to(torch.float8_e5m2)) == 3
    e4 = torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn)
    codes = e4.view(torch.uint8).clone()
    assert nonfinite_count(e4) == 0
    codes[1] = 0xFF
    assert nonfinite_count(codes.view(torch.float8_e4m3fn)) == 1
    assert nonfinite_count(torch.tensor([255], dtype=torch.uint8)) == 0
