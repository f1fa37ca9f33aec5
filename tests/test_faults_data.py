"""Bad input and faults (issue 15, items 8 and 11): calibration / evaluation / training text files that are
not what they should be, unknown --model-set fields, a device the machine lacks, an ``architectures`` entry
that is no model class, NaN weights, NVFP4 files with bad parts, the zero global amax, and the mode of
output folders. Every error must name the file / option / tensor and say what was expected; nothing may be
half-written. Tiny models and tiny files only."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nvfp4kit as nk
from nvfp4kit.calibrate.data import load_text
from nvfp4kit.checkpoint import CheckpointError
from nvfp4kit.textfiles import TextFileError, read_documents
from nvfp4kit.training.data import ByteTokenizer, load_packed_text, tokenize_files

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "the quick brown fox jumps over a lazy dog".split()
TEXT = " ".join(WORDS * 40)


# ----------------------------------------------------------------------------- text files

# name, bytes, the message after "<what> '<path>'" (a regex), for every reader of text
BAD_FILES = [
    ("empty.jsonl", b"", r" is empty; expected JSON records with a 'text' field"),
    ("blank.jsonl", b"\n  \n\n", r" is empty; expected JSON records with a 'text' field"),
    ("binary.jsonl", b'{"te' + bytes(range(256)), r" is not a text file \(a NUL byte at offset 4, line 1: "),
    ("binary.txt", b"line one\nline two\n\x7fELF\x02\x00\x00", r" is not a text file \(a NUL byte at offset 23, line 3"),
    ("latin1.txt", "caf\u00e9\nna\u00efve".encode("latin-1"),
     r" is not UTF-8 text \(byte 0xe9 at offset 3, line 1: .*\); save it as UTF-8"),
    ("late.txt", b"ok\nok\n\xff", r" is not UTF-8 text \(byte 0xff at offset 6, line 3"),
    ("malformed.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",\n',
     r": line 3 is not valid JSON \(.* at column \d+\); expected one JSON object per line"),
    ("empty-list.json", b"[]", r" holds no records \(an empty list\); expected JSON records with a 'text' field"),
    ("no-text.jsonl", b'{"body": "x", "id": 1}\n{"id": 2}\n',
     r" has no text records: no 'text' field with text \(the records have the fields: body, id\)"),
    ("only-empty.jsonl", b'{"text": ""}\n{"text": null}\n', r" has no text records: no 'text' field with text"),
    ("list-line.jsonl", b'{"text": "a"}\n[1, 2]\n', r": line 2 is a list, expected an object with a 'text' field"),
    ("number.jsonl", b'{"text": "a"}\n\n{"text": 7}\n', r": line 3: the 'text' field is a number, expected a string"),
    ("not-json.json", b'{"text": "a"}, {"text": "b"', r" is not valid JSON \(.* at line 1, column \d+\); expected a list"),
    ("scalars.json", b"[1, 2]", r": record 1 is a number, expected an object with a 'text' field"),
]


@pytest.mark.parametrize("name,data,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_text_files_are_refused_naming_the_file(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    quoted = re.escape(repr(str(path)))
    with pytest.raises(TextFileError, match=r"^calibration/evaluation text " + quoted + message):
        load_text(path)
    with pytest.raises(TextFileError, match=r"^--data file " + quoted + message):
        tokenize_files([str(path)], ByteTokenizer())
    with pytest.raises(ValueError, match=quoted):  # the training pipeline's entry, and a folder of the file
        load_packed_text([str(path)], ByteTokenizer(), 8)


def test_a_folder_names_the_bad_file_inside_it(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x"}\n{oops\n')
    with pytest.raises(TextFileError, match=re.escape(repr(str(tmp_path / "b.jsonl"))) + r": line 2 is not valid"):
        load_text(tmp_path)
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "good.txt").write_text("fine", encoding="utf-8")
    (txt / "bad.txt").write_bytes(b"\x00\x01")
    with pytest.raises(TextFileError, match=re.escape(repr(str(txt / "bad.txt")))):
        load_text(txt)
    with pytest.raises(TextFileError, match=re.escape(repr(str(txt / "bad.txt")))):
        load_packed_text([str(txt)], ByteTokenizer(), 2)


def test_empty_plain_text(tmp_path):
    (tmp_path / "e.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(TextFileError, match=re.escape(repr(str(tmp_path / "e.txt"))) + r" is empty \(or only white"):
        load_text(tmp_path / "e.txt")
    (tmp_path / "z.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--data: the files .*z\.txt.* hold no text"):
        tokenize_files([str(tmp_path / "z.txt")], ByteTokenizer())
    with pytest.raises(TextFileError, match=r"is a folder, expected a file"):
        read_documents(tmp_path)


def test_valid_neighbours_read_exactly(tmp_path):
    cases = {
        "lines.jsonl": (b'{"text": "one"}\n\n{"text": "two", "id": 3}\n{"id": 4}\n{"text": null}\n{"text": ""}\n',
                        ["one", "two"]),
        "bom.jsonl": (("\ufeff" + json.dumps({"text": "bom first"}) + "\n").encode("utf-8"), ["bom first"]),
        "list.json": (json.dumps([{"text": "a b"}, {"other": 1}, {"text": "c"}]).encode(), ["a b", "c"]),
        "object.json": (json.dumps({"text": "just one"}).encode(), ["just one"]),
        "jsonlines.json": (b'{"text": "x"}\n{"text": "y"}\n', ["x", "y"]),
        "crlf.txt": (b"a\r\nb\rc\n", ["a\nb\nc\n"]),
        "unicode.md": ("h\u00e9llo w\u00f6rld \u2603".encode("utf-8"), ["h\u00e9llo w\u00f6rld \u2603"]),
    }
    for name, (data, docs) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert read_documents(tmp_path / name) == docs, name
        assert load_text(tmp_path / name) == "\n\n".join(docs), name
    # training: one document per record, each followed by end-of-text
    ids = tokenize_files([str(tmp_path / "lines.jsonl"), str(tmp_path / "crlf.txt")], ByteTokenizer())
    assert ids.tolist() == list(b"one") + [256] + list(b"two") + [256] + list(b"a\nb\nc\n") + [256]
    # another text field
    (tmp_path / "body.jsonl").write_text('{"body": "in body"}\n', encoding="utf-8")
    assert load_text(tmp_path / "body.jsonl", text_field="body") == "in body"


def test_tables_through_datasets(tmp_path):
    (tmp_path / "t.csv").write_text("id,text\n1,first row\n2,second row\n", encoding="utf-8")
    assert load_text(tmp_path / "t.csv") == "first row\n\nsecond row"
    (tmp_path / "n.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(TextFileError, match=re.escape(repr(str(tmp_path / "n.csv"))) +
                       r" has no 'text' column \(columns: id, body\)"):
        load_text(tmp_path / "n.csv")
    (tmp_path / "b.parquet").write_bytes(b"not a parquet file at all" * 4)
    with pytest.raises(TextFileError, match=re.escape(repr(str(tmp_path / "b.parquet"))) +
                       r" cannot be read as parquet \(\w+"):
        load_text(tmp_path / "b.parquet")


# ----------------------------------------------------------------------------- tiny model folders


def _save_tokenizer(path):
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))


def _llama_dir(path, nan_at: str | None = None, value=float("nan"), architectures=("LlamaForCausalLM",)):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    if nan_at is not None:
        with torch.no_grad():
            model.get_submodule(nan_at).weight[3, 5] = value
    model.save_pretrained(str(path))
    _save_tokenizer(path)
    (path / "calib.txt").write_text(TEXT, encoding="utf-8")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = list(architectures)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from nvfp4kit.cli.main import app

    runner = CliRunner()

    def invoke(*args):
        res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "2000"})  # no wrapped paths
        return res.exit_code, " ".join(res.output.replace("│", " ").split())

    return invoke


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_command_names_a_bad_text_file(llama_dir, tmp_path, cli):
    bad = tmp_path / "calib.jsonl"
    bad.write_bytes(b'{"text": "the fox"}\n{"text": "the dog"\n')
    expected = _flat(f"'{bad}': line 2 is not valid JSON")
    out = tmp_path / "q"
    code, text = cli("quantize", "--model", llama_dir, "--out", out, "--calib", bad, "--calib-samples", 2,
                     "--seq-len", 16, "--weight-scale", "max", "--smooth", "none")
    assert code == 2 and expected in text and "Traceback" not in text, text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["calib.jsonl"]  # nothing half-written
    code, text = cli("eval", "--model", llama_dir, "--text", bad, "--seq-len", 16)
    assert code == 2 and expected in text, text
    code, text = cli("qat", "--model", llama_dir, "--data", bad, "--steps", 1, "--seq-len", 16, "--out", out)
    assert code == 2 and expected in text, text
    assert [p.name for p in tmp_path.iterdir()] == ["calib.jsonl"]  # no OUT, no OUT.qat training state
    binary = tmp_path / "ls"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    code, text = cli("train", "--data", binary, "--out", tmp_path / "run", "--steps", 1, "--seq-len", 16)
    assert code == 2 and _flat(f"--data file '{binary}' is not a text file (a NUL byte at offset 7, line 1") in text, text


# ----------------------------------------------------------------------------- train options


def test_unknown_model_set_field_lists_the_valid_ones(tmp_path, cli):
    from nvfp4kit.model.config import NemotronConfig
    from nvfp4kit.model.lm import build_model
    from nvfp4kit.model.presets import get_preset

    data = tmp_path / "d.txt"
    data.write_text(TEXT, encoding="utf-8")
    code, text = cli("train", "--data", data, "--out", tmp_path / "run", "--model-set", "bogus=3", "--steps", 1)
    assert code == 2 and "unknown --model-set field 'bogus'; valid fields: attention_bias," in text, text
    assert "hidden_size" in text and "vocab_size" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"^unknown config fields 'bogus', 'hiden_size'; valid fields: .*hidden_size"):
        get_preset("tiny", bogus=1, hiden_size=2)
    with pytest.raises(ValueError, match=r"^unknown config field 'extra'"):  # the internal catch-all is not settable
        NemotronConfig().replace(extra={})
    with pytest.raises(ValueError, match=r"^unknown config field 'n_layers'"):
        build_model(get_preset("tiny"), n_layers=2)
    assert get_preset("tiny", hidden_size=128).hidden_size == 128  # a real field still works


def test_train_device_the_machine_lacks(tmp_path, cli):
    data = tmp_path / "d.txt"
    data.write_text(TEXT, encoding="utf-8")
    if torch.cuda.is_available():  # a GPU machine lacks the device after its last one
        device, message = f"cuda:{torch.cuda.device_count()}", f"there are {torch.cuda.device_count()} CUDA device(s)"
    else:
        device, message = "cuda", "has no usable CUDA device"
    code, text = cli("train", "--data", data, "--out", tmp_path / "run", "--device", device, "--steps", 1)
    assert code == 2 and f"--device {device}:" in text, text
    assert message in text and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", ["LlamaConfig", "AutoTokenizer", "GenerationConfig"])
def test_architectures_naming_a_non_model_class(tmp_path, arch):
    from transformers import AutoConfig

    from nvfp4kit.pipelines.models import hf_model_class, open_by_block
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    d = _llama_dir(tmp_path / "m", architectures=(arch,))
    expected = re.escape(f"{d}: config.json's \"architectures\" names {arch!r}, which is not a model class of "
                         "transformers; name the model's class (e.g. 'LlamaForCausalLM' for model_type 'llama')")
    with pytest.raises(ValueError, match=expected):
        hf_model_class(AutoConfig.from_pretrained(str(d)))
    with pytest.raises(ValueError, match=expected):
        open_by_block(d)
    with pytest.raises(ValueError, match=expected):
        run_quantize(QuantizeJob(model=str(d), out=str(tmp_path / "q"), scheme="w4a16", weight_scale="max",
                                 calib=str(d / "calib.txt"), calib_samples=2, seq_len=16, load="whole"))
    assert not (tmp_path / "q").exists()


def test_architectures_neighbours_still_load(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from nvfp4kit.pipelines.models import CAUSAL_LM, hf_model_class

    for arch, cls in [("LlamaForCausalLM", LlamaForCausalLM), ("AutoModelForCausalLM", AutoModelForCausalLM),
                      ("SomeRemoteCodeForCausalLM", AutoModelForCausalLM)]:  # unknown to transformers: by model_type
        cfg = AutoConfig.for_model("llama", architectures=[arch])
        got = hf_model_class(cfg)
        assert got.cls is cls and got.kind == CAUSAL_LM, arch


# ----------------------------------------------------------------------------- NaN weights


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory):
    return _llama_dir(tmp_path_factory.mktemp("nan"), nan_at="model.layers.1.self_attn.k_proj")


@pytest.mark.parametrize("scheme,weight_scale,smooth,load", [
    ("w4a16", "max", "none", "whole"),  # the reported case: it named no tensor
    ("w4a16", "max", "awq", "whole"),
    ("w4a16", "mse", "none", "whole"),
    ("w4a16", "4over6", "none", "whole"),
    ("w4a16", "gptq", "none", "blocks"),
    ("w4a4", "max", "none", "blocks"),
    ("w4a4", "gptq", "awq", "blocks"),
    ("fp8", "max", "none", "whole"),
])
def test_a_nan_weight_is_named_by_every_method(nan_dir, tmp_path, scheme, weight_scale, smooth, load):
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    fmt = "FP8 E4M3" if scheme == "fp8" else "NVFP4"
    job = QuantizeJob(model=str(nan_dir), out=str(tmp_path / "q"), scheme=scheme, weight_scale=weight_scale,
                      smooth=smooth, load=load, calib=str(nan_dir / "calib.txt"), calib_samples=2, seq_len=16)
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.self_attn\.k_proj\.weight: contains NaN or inf values "
                                         rf"\(1 NaN, 0 inf\); {fmt} has no encoding for them"):
        run_quantize(job)
    assert not (tmp_path / "q").exists()


def test_check_weights_inf_and_meta(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvfp4kit.calibrate.ptq import plan_model
    from nvfp4kit.calibrate.records import check_weights

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    plan = plan_model(model, "w4a4")
    names = plan.quantized()
    check_weights(model, plan, names)  # clean: no error
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj\.weight: contains NaN or inf values "
                                         r"\(0 NaN, 1 inf\)"):
        check_weights(model, plan, names)
    block = model.model.layers[0]  # block-relative names, named in full
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj\.weight:"):
        check_weights(block, plan, ["mlp.down_proj"], "model.layers.0")
    block.mlp.down_proj.to("meta")  # not loaded yet: checked when its block is
    check_weights(block, plan, ["mlp.down_proj"], "model.layers.0")


# ----------------------------------------------------------------------------- load_nvfp4


def _nvfp4_file(tmp_path, block=(1, 16)):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    q = nk.quantize(torch.randn(32, 64), block=block)
    nk.save_nvfp4({"w": q, "bias": torch.ones(3)}, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, q, load_file(str(path)), meta


def _tampered(path, flat, meta, change_meta=None):
    if change_meta is not None:
        info = json.loads(meta["nvfp4kit.nvfp4_tensors"])
        change_meta(info["w"])
        meta = dict(meta, **{"nvfp4kit.nvfp4_tensors": json.dumps(info)})
    save_file(flat, str(path), metadata=meta)
    return path


def _scale_bits(flat, index, code):
    bits = flat["w.block_scale"].view(torch.uint8).clone()
    bits.view(-1)[index] = code
    return bits.view(torch.float8_e4m3fn)


def test_load_nvfp4_valid_file_roundtrips(tmp_path):
    path, q, _, _ = _nvfp4_file(tmp_path, block=(16, 16))
    back = nk.load_nvfp4(path)["w"]
    assert torch.equal(back.packed, q.packed) and torch.equal(back.global_decode_scale, q.global_decode_scale)
    assert torch.equal(back.block_scale.view(torch.uint8), q.block_scale.view(torch.uint8)) and back.block == (16, 16)
    zero = tmp_path / "z.safetensors"  # an all-zero tensor: zero block scales, global decode scale 1
    nk.save_nvfp4({"z": nk.quantize(torch.zeros(4, 32))}, zero)
    assert torch.equal(nk.load_nvfp4(zero)["z"].dequantize(), torch.zeros(4, 32))


BAD_PARTS = [
    ("NaN block scale", lambda f: f.update({"w.block_scale": _scale_bits(f, 5, 0x7F)}), None,
     r"block_scale has 1 NaN and 0 negative entries"),
    ("negative block scale", lambda f: f.update({"w.block_scale": _scale_bits(f, 2, 0xB8)}), None,
     r"block_scale has 0 NaN and 1 negative entries"),
    ("NaN global scale", lambda f: f.update({"w.global_decode_scale": torch.tensor(float("nan"))}), None,
     r"global_decode_scale must be finite and > 0, got nan"),
    ("negative global scale", lambda f: f.update({"w.global_decode_scale": torch.tensor(-0.5)}), None,
     r"global_decode_scale must be finite and > 0, got -0\.5"),
    ("zero global scale", lambda f: f.update({"w.global_decode_scale": torch.tensor(0.0)}), None,
     r"global_decode_scale must be finite and > 0, got 0\.0"),
    ("inf global scale", lambda f: f.update({"w.global_decode_scale": torch.tensor(float("inf"))}), None,
     r"global_decode_scale must be finite and > 0, got inf"),
    ("float64 global scale", lambda f: f.update({"w.global_decode_scale": torch.tensor(0.01, dtype=torch.float64)}),
     None, r"global_decode_scale must be one float32 value, got torch\.float64"),
    ("two global scales", lambda f: f.update({"w.global_decode_scale": torch.ones(2)}), None,
     r"global_decode_scale must be one float32 value, got torch\.float32 of shape \(2,\)"),
    ("int8 packed", lambda f: f.update({"w.packed": f["w.packed"].view(torch.int8)}), None,
     r"packed must be uint8, got torch\.int8"),
    ("float32 block scale", lambda f: f.update({"w.block_scale": f["w.block_scale"].float()}), None,
     r"block_scale must be float8_e4m3fn, got torch\.float32"),
    ("odd block", None, lambda m: m.update(block=[3, 16]), r"block must be \(1, 16\) or \(16, 16\), got \(3, 16\)"),
    ("8-element block", None, lambda m: m.update(block=[1, 8]), r"block must be \(1, 16\) or \(16, 16\)"),
    ("block not a pair", None, lambda m: m.update(block=16), r"block must be \[1, 16\] or \[16, 16\], got 16"),
    ("half a block", lambda f: f.update({"w.packed": f["w.packed"][:, :4].contiguous(),
                                         "w.block_scale": f["w.block_scale"][:, :0].contiguous()}), None,
     r"packed shape \(32, 4\) does not hold whole blocks of 16 elements"),
    ("scale shape", lambda f: f.update({"w.block_scale": f["w.block_scale"][:, :3].contiguous()}), None,
     r"block_scale shape \(32, 3\) does not match packed \(32, 32\)"),
    ("2D tile", None, lambda m: m.update(block=[16, 16]),  # 1x16 scales, declared 16x16
     r"16x16 blocks, but the block scales differ within a tile of 16 rows"),
    ("int dtype", None, lambda m: m.update(dtype="int8"), r"dtype 'int8' is not a floating torch dtype"),
    ("unknown dtype", None, lambda m: m.update(dtype="bogus"), r"dtype 'bogus' is not a floating torch dtype"),
    ("transposed flag", None, lambda m: m.update(transposed="yes"), r"transposed must be true .* got 'yes'"),
    ("missing layout", None, lambda m: m.pop("block"), r"its layout metadata must give dtype, block and transposed"),
]


@pytest.mark.parametrize("what,change,change_meta,message", BAD_PARTS, ids=[c[0] for c in BAD_PARTS])
def test_load_nvfp4_refuses_bad_parts_naming_the_tensor(tmp_path, what, change, change_meta, message):
    path, _, flat, meta = _nvfp4_file(tmp_path)
    if change is not None:
        change(flat)
    _tampered(path, flat, meta, change_meta)
    with pytest.raises(CheckpointError, match=r"^NVFP4 tensor 'w' in " + re.escape(str(path)) + ": " + message):
        nk.load_nvfp4(path)


def test_load_nvfp4_bad_metadata_json(tmp_path):
    path, _, flat, meta = _nvfp4_file(tmp_path)
    save_file(flat, str(path), metadata=dict(meta, **{"nvfp4kit.nvfp4_tensors": "{not json"}))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": the 'nvfp4kit.nvfp4_tensors' metadata is not"):
        nk.load_nvfp4(path)


# ----------------------------------------------------------------------------- the zero global amax


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v, max=448.0).to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_zero_global_amax_means_global_scale_one(backend):
    """README: a caller's global_amax below the data's amax saturates, except 0: as for an all-zero tensor,
    the encode scale is then 1, so the block scales are e4m3(block_amax / 6) and only blocks whose amax
    exceeds 6 * 448 = 2688 saturate."""
    torch.manual_seed(1)
    x = torch.randn(4, 64) * 3
    x[0, 0] = 5000.0  # a block past 2688
    q = nk.quantize(x, global_amax=0.0, backend=backend)
    assert float(q.global_decode_scale) == 1.0
    block_amax = x.abs().reshape(4, 4, 16).amax(-1)
    assert torch.equal(q.block_scale.float(), _e4m3(block_amax * torch.tensor(1 / 6, dtype=torch.float32)))
    deq = q.dequantize()
    assert float(deq[0, 0]) == 2688.0  # saturated: scale 448, element 6
    ok = torch.ones_like(x, dtype=torch.bool)
    ok[0, :16] = False
    step = (q.block_scale.float().repeat_interleave(16, -1))  # the widest E2M1 gap (4 -> 6) is 2 steps
    assert bool(((deq - x).abs()[ok] <= step[ok] + 1e-6).all())  # elsewhere quantized, not saturated
    # a tiny positive amax does saturate, as the README says
    t = nk.quantize(x, global_amax=1e-30, backend=backend)
    assert bool((t.block_scale.float() == 448.0).all())
    assert float(t.dequantize().abs().max()) == pytest.approx(1e-30, rel=1e-6)
    # the all-zero tensor: global scale 1, zero block scales, zeros back
    z = nk.quantize(torch.zeros(2, 32), backend=backend)
    assert float(z.global_decode_scale) == 1.0 and not bool(z.block_scale.float().any())
    assert torch.equal(z.dequantize(), torch.zeros(2, 32))


# ----------------------------------------------------------------------------- output modes


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    from nvfp4kit import scratch
    from nvfp4kit.checkpoint.writer import ShardedWriter
    from nvfp4kit.model.config import NemotronConfig

    old = os.umask(mask)
    try:
        assert scratch.umask() == mask
        out = tmp_path / "ckpt"
        with ShardedWriter(out) as w:
            w.add("a", torch.ones(2))
            w.write_json("config.json", {"x": 1})
        assert _mode(out) == 0o777 & ~mask
        assert {p.name: _mode(p) for p in out.iterdir()} == {"model.safetensors": 0o666 & ~mask,
                                                              "config.json": 0o666 & ~mask}
        nk.save_nvfp4({"w": nk.quantize(torch.ones(2, 16))}, tmp_path / "w.safetensors")
        assert _mode(tmp_path / "w.safetensors") == 0o666 & ~mask
        cfg_path = NemotronConfig().save_json(tmp_path / "hybrid")
        assert _mode(cfg_path) == 0o666 & ~mask
        from nvfp4kit.calibrate.mixed import MixedPrecisionPlan

        MixedPrecisionPlan({"a": "nvfp4"}, 4.5, 4.5).save(tmp_path / "plan.json")
        assert _mode(tmp_path / "plan.json") == 0o666 & ~mask
        from nvfp4kit.training.checkpointing import save_checkpoint

        lin = torch.nn.Linear(4, 4)
        step_dir = save_checkpoint(tmp_path / "run", 1, lin, torch.optim.AdamW(lin.parameters()), {})
        assert _mode(step_dir) == 0o777 & ~mask
        assert {p.name: _mode(p) for p in step_dir.glob("*.safetensors")} == {
            f: 0o666 & ~mask for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hybrid", "plan.json", "run", "w.safetensors"]
    finally:
        os.umask(old)
    assert scratch.umask() == old
