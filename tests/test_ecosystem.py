"""nvfp4kit in its ecosystem: the transformers releases it supports, the GGUF tokenizers those releases
build (and the ones they build wrongly), and every command on the install the README names for it."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nvfp4kit import progress
from nvfp4kit.optional import MissingDependency, require
from nvfp4kit.pipelines import gguf_tokenizer as gt

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the transformers pin


def test_the_installed_transformers_is_inside_the_pin():
    """CI runs this in the newest release and in the lowest supported one: both inside the pin."""
    import transformers
    from packaging.specifiers import SpecifierSet

    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"transformers([^"]+)"', text).group(1)
    assert transformers.__version__ in SpecifierSet(pin), (transformers.__version__, pin)
    assert "5.15.0" in SpecifierSet(pin) and "5.23.0" in SpecifierSet(pin)


def test_version_tuple():
    assert gt.version_tuple("5.17.0") == (5, 17, 0)
    assert gt.version_tuple("5.23.0.dev0") == (5, 23, 0)
    assert gt.version_tuple("5.9") < gt.version_tuple("5.18.0") < gt.version_tuple("5.23.1")


# ----------------------------------------------------------------------------- GGUF tokenizer checks


class _FakeTokenizer:
    """A tokenizer of ``size`` pieces that cuts text by ``split`` (characters or words)."""

    def __init__(self, size: int, split):
        self.size, self.split = size, split

    def __len__(self):
        return self.size

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(p) % self.size for p in self.split(text)]}


CHARS = _FakeTokenizer(50_000, list)
WORDS = _FakeTokenizer(50_000, lambda t: re.findall(r" ?\w+|[^\w ]", t))


def test_the_probe_flags_a_character_level_tokenizer_naming_file_and_version():
    found = gt.gguf_tokenizer_warnings(CHARS, "/models/gemma-3-1b-it-Q4_0.gguf", "llama", "5.99.0")
    assert len(found) == 1
    n = len(gt.PROBE_SENTENCE)
    assert f"gemma-3-1b-it-Q4_0.gguf (transformers 5.99.0) splits a plain English sentence of {n} characters " \
           f"into {n} tokens (1.00 characters per token" in found[0]
    assert "pip install -U 'transformers>=5.23'" in found[0]
    # a real vocabulary's split passes; a tiny (character-level by design) vocabulary is not judged
    assert gt.gguf_tokenizer_warnings(WORDS, "m.gguf", "llama", "5.99.0") == []
    assert gt.gguf_tokenizer_warnings(_FakeTokenizer(300, list), "m.gguf", "llama", "5.99.0") == []
    n_words = len(WORDS(gt.PROBE_SENTENCE)["input_ids"])
    assert len(gt.PROBE_SENTENCE) / n_words > 3  # what a word-level split gives on the probe


@pytest.mark.parametrize("model_type,version,known", [
    ("gemma3_text", "5.17.0", True), ("gemma2", "5.15.0", True), ("gemma4_text", "5.17.2", True),
    ("gemma3_text", "5.18.0", False), ("gemma3_text", "5.23.0", False), ("llama", "5.17.0", False),
])
def test_known_wrong_conversions_by_version(model_type, version, known):
    found = gt.gguf_tokenizer_warnings(WORDS, "g.gguf", model_type, version)
    assert len(found) == int(known)
    if known:
        assert found[0].startswith(f"the tokenizer of g.gguf (transformers {version}) is known to be wrong")
        assert "Unigram" in found[0] and "fixed in 5.18" in found[0]


def _gemma_like_gguf(path: Path, n_vocab: int = 1100) -> list[str]:
    """A sentencepiece ("llama") GGUF of architecture gemma3 whose pieces spell PROBE_SENTENCE: single
    characters first, then every prefix of every word (each merge one character longer), padded with
    unused pieces. As in Gemma files, the scores do not follow the merge order (characters score 0, longer
    pieces less): a Unigram driven by the scores cuts prose into characters, BPE in file order into words.
    Returns the tokens BPE must give: the first word has no leading space (Gemma adds no prefix), so it is
    spelled by its characters."""
    from gguf import GGUFWriter

    words = gt.PROBE_SENTENCE.split(" ")
    chars = sorted(set(gt.PROBE_SENTENCE.replace(" ", ""))) + ["\u2581"]
    tokens, types = ["<pad>", "<eos>", "<bos>", "<unk>"] + chars, [3, 3, 3, 2] + [1] * len(chars)
    for word in words:
        for k in range(2, len(word) + 2):
            if ("\u2581" + word)[:k] not in tokens:
                tokens.append(("\u2581" + word)[:k])
                types.append(1)
    n_real = len(tokens)
    tokens += [f"<unused{i}>" for i in range(n_vocab - n_real)]
    types += [5] * (n_vocab - n_real)
    scores = [-1000.0] * 4 + [0.0] * len(chars) + [-1.0 - i for i in range(n_real - 4 - len(chars))]
    scores += [-1e4] * (n_vocab - n_real)
    w = GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return list(words[0]) + ["\u2581" + word for word in words[1:]]


def test_a_gemma_gguf_tokenizer_is_right_on_new_transformers_and_flagged_on_old(tmp_path, caplog):
    """The issue's Gemma 3 case in miniature, on whichever transformers is installed (CI runs the newest
    and the lowest supported)."""
    import transformers
    from transformers import AutoTokenizer

    expected = _gemma_like_gguf(tmp_path / "g.gguf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="g.gguf")
    pieces = tok.convert_ids_to_tokens(tok(gt.PROBE_SENTENCE, add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        found = gt.check_gguf_tokenizer(tok, tmp_path / "g.gguf", "gemma3_text")
    if gt.version_tuple(transformers.__version__) >= (5, 18):
        assert pieces == expected
        assert found == []
    else:  # the old converter: one piece per character, and both checks say so
        assert pieces == [c if c != " " else "\u2581" for c in gt.PROBE_SENTENCE]
        assert len(found) == 2
        assert all("g.gguf (transformers " in f for f in found)
        assert sum(r.getMessage().startswith("warning: the tokenizer of g.gguf") for r in caplog.records) == 2


def test_the_embedded_smollm2_tokenizer_gives_the_same_ids_on_every_release():
    """SmolLM2's byte-level BPE: the ids transformers 5.15, 5.17 and 5.23 give (5.17 and 5.23 were also
    compared on 20,000 characters of the built-in text: identical), written out here, and the pieces
    they stand for; the check passes it (about 4 characters per token)."""
    from nvfp4kit.pipelines.models import embedded_model_path

    path = embedded_model_path()
    tok = gt.load_gguf_tokenizer(path, "llama")
    ids = tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    assert ids == [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
    assert tok.convert_ids_to_tokens(ids) == ["The", "\u0120quick", "\u0120brown", "\u0120fox", "\u0120jumps",
                                              "\u0120over", "\u0120the", "\u0120lazy", "\u0120dog", "."]
    assert gt.probe(tok)[1] > 3.5
    assert gt.check_gguf_tokenizer(tok, path, "llama") == []


def test_every_gguf_load_goes_through_the_check(monkeypatch, tmp_path, caplog):
    """The loaders build GGUF tokenizers with load_gguf_tokenizer only, which runs the check (here with a
    probe that reports one token a character)."""
    import inspect

    from nvfp4kit.pipelines import models

    src = inspect.getsource(models)
    assert "AutoTokenizer.from_pretrained(str(p.parent), gguf_file" not in src
    assert src.count("load_gguf_tokenizer(p, ") == 2  # load_source_model and open_by_block
    _gemma_like_gguf(tmp_path / "g.gguf")
    monkeypatch.setattr(gt, "probe", lambda tokenizer: (163, 1.0))
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        gt.load_gguf_tokenizer(tmp_path / "g.gguf", "llama")
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning: the tokenizer of")]
    assert len(warned) == 1 and "g.gguf (transformers " in warned[0] and "1.00 characters per token" in warned[0]


# ----------------------------------------------------------------------------- optional dependencies


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependency) as e:
        require("datasets", "reading parquet files")
    assert isinstance(e.value, ImportError) and e.value.extra == "hf"
    assert str(e.value) == "reading parquet files needs datasets, which is not installed: pip install 'nvfp4kit[hf]'"
    assert e.value.for_command("nvfp4kit train") == ("nvfp4kit train needs the 'hf' extra (datasets is not "
                                                    "installed; used for reading parquet files): "
                                                    "pip install 'nvfp4kit[hf]'")
    assert require("json", "x") is sys.modules["json"]


def test_a_broken_install_is_not_reported_as_missing(monkeypatch, tmp_path):
    """An installed module whose own dependency is missing raises that error, not 'install the extra'."""
    (tmp_path / "brokenpkg_nvfp4kit.py").write_text("import a_module_that_does_not_exist_nvfp4kit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist_nvfp4kit"):
        require("brokenpkg_nvfp4kit", "x")


def _cli(monkeypatch, capsys, hidden: list[str], args: list[str]) -> tuple[int, str]:
    from nvfp4kit.cli.main import main

    for m in hidden:
        monkeypatch.setitem(sys.modules, m, None)
    monkeypatch.setattr(progress, "use_terminal", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["nvfp4kit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


HF_LINE = "error: nvfp4kit {cmd} needs the 'hf' extra ({module} is not installed; used for {purpose}): " \
          "pip install 'nvfp4kit[hf]'\n"
MODELS = "loading Hugging Face and GGUF models"


@pytest.mark.parametrize("hidden,args,module,purpose", [
    (["transformers"], ["quantize", "--out", "{tmp}/q"], "transformers", MODELS),
    (["transformers"], ["eval"], "transformers", MODELS),
    (["transformers"], ["demo", "--out", "{tmp}/d"], "transformers", MODELS),
    (["transformers"], ["qat", "--out", "{tmp}/qat"], "transformers", MODELS),
    (["gguf"], ["eval", "--max-tokens", "64"], "gguf", "reading .gguf models"),
    (["transformers"], ["train", "--data", "{tmp}/a.txt", "--out", "{tmp}/run", "--tokenizer", "{tmp}"],
     "transformers", "--tokenizer DIR (a Hugging Face tokenizer)"),
    (["datasets"], ["train", "--data", "{tmp}/a.parquet", "--out", "{tmp}/run"], "datasets", "reading parquet files"),
    (["matplotlib"], ["inspect", "{tmp}", "--plot", "{tmp}/e.png"], "matplotlib", "drawing --plot charts"),
    (["transformers"], ["inspect", "{tmp}", "--against", "{tmp}"], "transformers", MODELS),
])
def test_each_command_names_the_extra_it_needs(monkeypatch, capsys, tmp_path, hidden, args, module, purpose):
    (tmp_path / "a.txt").write_text("some text to train on. " * 50)
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    code, err = _cli(monkeypatch, capsys, hidden, [a.format(tmp=tmp_path) for a in args])
    assert code == 1
    assert err == HF_LINE.format(cmd=args[0], module=module, purpose=purpose)
    assert not (tmp_path / "q").exists() and not (tmp_path / "d").exists() and not (tmp_path / "run").exists()


def test_block_by_block_loading_names_accelerate(monkeypatch):
    from nvfp4kit.pipelines.models import open_by_block

    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingDependency) as e:
        open_by_block(None)
    assert e.value.module == "accelerate" and e.value.extra == "hf"


def test_train_runs_on_the_core_install(monkeypatch, capsys, tmp_path, caplog):
    """`pip install nvfp4kit` then `nvfp4kit train` on text files with the byte tokenizer: no optional
    module needed; only the loss chart is skipped, saying so once."""
    (tmp_path / "a.txt").write_text("hello world, this is some text to train on. " * 40)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        code, err = _cli(monkeypatch, capsys, ["transformers", "datasets", "gguf", "accelerate", "matplotlib"],
                         ["train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run"), "--steps", "1",
                          "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--ckpt-every", "1"])
    assert code in (0, None), err
    assert (tmp_path / "run" / "metrics.csv").is_file() and not (tmp_path / "run" / "loss.png").exists()
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss.png is not drawn")]
    assert skipped == ["loss.png is not drawn: drawing loss.png needs matplotlib, which is not installed: "
                       "pip install 'nvfp4kit[hf]'"]


# ----------------------------------------------------------------------------- the demo's thread count


def test_the_demo_computes_with_its_fixed_thread_count(monkeypatch):
    """Large reductions split into per-thread partial sums whose last bits depend on the thread count, so
    the demo fixes it (for the run only, then restores it) and machines agree on its figures."""
    from nvfp4kit.pipelines import demo

    before = torch.get_num_threads()
    assert demo.DemoJob().threads == 2
    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda job: seen.append(torch.get_num_threads()) or "result")
    torch.set_num_threads(2)
    assert demo.run_demo(demo.DemoJob(threads=1)) == "result"
    assert seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        demo.run_demo(demo.DemoJob(threads=0))
    torch.set_num_threads(before)
