"""BOS: calibration samples, evaluation windows and QAT windows start with the tokenizer's BOS when it
adds one (and never when it does not, or with --no-bos)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from nvfp4kit import progress
from nvfp4kit.calibrate.data import calibration_samples, leading_special_token, sample_bos, token_samples, tokenize
from nvfp4kit.evaluate.perplexity import perplexity

CHARS = ["<unk>", "<s>", "</s>", "[CLS]", "[SEP]"] + [chr(i) for i in range(32, 127)] + ["\n"]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "Pack my box with five dozen liquor jugs!\n") * 30


def _tokenizer(template: str | None):
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    specials = {"<s>": vocab["<s>"], "</s>": vocab["</s>"], "[CLS]": vocab["[CLS]"], "[SEP]": vocab["[SEP]"]}
    if template is not None:
        used = [(t, i) for t, i in specials.items() if t in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="module")
def with_bos():
    return _tokenizer("<s> $A")  # Llama 3 / Gemma / Mistral style


@pytest.fixture(scope="module")
def without_bos():
    return _tokenizer(None)  # GPT-2 / Qwen / SmolLM2 style


def test_the_leading_special_token_is_found_only_where_the_tokenizer_adds_one(with_bos, without_bos):
    assert leading_special_token(with_bos) == CHARS.index("<s>")
    assert leading_special_token(without_bos) is None
    assert leading_special_token(_tokenizer("[CLS] $A [SEP]")) == CHARS.index("[CLS]")  # BERT
    assert leading_special_token(_tokenizer("$A </s>")) is None  # a trailing EOS is not a BOS
    assert sample_bos(with_bos, bos=False) is None and sample_bos(None) is None


def test_token_samples_with_bos_are_bos_then_the_next_tokens():
    ids = torch.arange(100, 120)
    got = token_samples(ids, 3, 5, bos_id=7)
    expect = torch.tensor([[7, 100, 101, 102, 103], [7, 104, 105, 106, 107], [7, 108, 109, 110, 111]])
    assert torch.equal(got, expect)
    assert torch.equal(token_samples(ids, 2, 5), torch.arange(100, 110).reshape(2, 5))
    assert token_samples(ids, 100, 5, bos_id=7).shape == (5, 5)  # 20 text tokens, 4 per sample
    with pytest.raises(ValueError, match="at least 2"):
        token_samples(ids, 1, 1, bos_id=7)


def test_calibration_samples_start_with_bos_when_the_tokenizer_adds_it(with_bos, without_bos, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(TEXT)
    stream = tokenize(with_bos, TEXT)
    got = calibration_samples(with_bos, str(f), 4, 16)
    assert (got[:, 0] == CHARS.index("<s>")).all()
    assert torch.equal(got[:, 1:].reshape(-1), stream[: 4 * 15])
    assert torch.equal(calibration_samples(with_bos, str(f), 4, 16, bos=False), stream[:64].reshape(4, 16))
    assert torch.equal(calibration_samples(without_bos, str(f), 4, 16), tokenize(without_bos, TEXT)[:64].reshape(4, 16))


def test_perplexity_windows_with_bos_predict_every_text_token(tiny_llama, with_bos):
    model = tiny_llama(vocab=len(CHARS), layers=1, max_positions=64)
    ids = tokenize(with_bos, TEXT)[:70]
    bos = CHARS.index("<s>")
    got = perplexity(model, ids, 16, bos_id=bos)
    # by hand: windows of BOS + 15 text tokens (the last one shorter), every text token predicted
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.numel(), 15):
            w = torch.cat([torch.tensor([bos]), ids[s:s + 15]])
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, w[1:, None]).sum())
            count += w.numel() - 1
    assert got.n_tokens == 70 == count and got.bos_id == bos
    assert math.isclose(got.nll, total / count, rel_tol=1e-5)
    plain = perplexity(model, ids, 16)
    assert plain.n_tokens == 70 - 5 and plain.bos_id is None  # 5 windows, the first token of each unpredicted


def test_quantize_eval_and_qat_use_bos_and_say_so(tiny_llama, with_bos, tmp_path, monkeypatch):
    from nvfp4kit.calibrate import data
    from nvfp4kit.pipelines.eval import run_eval
    from nvfp4kit.pipelines.qat import split_tokens, training_windows
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    src = tmp_path / "m"
    tiny_llama(vocab=len(CHARS), layers=2, max_positions=64).save_pretrained(src)
    with_bos.save_pretrained(src)
    (tmp_path / "calib.txt").write_text(TEXT)
    seen = []
    real = data.token_samples
    monkeypatch.setattr(data, "token_samples", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    log = io.StringIO()
    before = progress._reporter
    progress.use_lines(log)
    try:
        job = dict(model=str(src), calib=str(tmp_path / "calib.txt"), calib_samples=2, seq_len=16, scheme="w4a4",
                   weight_scale="max")
        run_quantize(QuantizeJob(out=str(tmp_path / "q"), **job))
        assert (seen[-1][:, 0] == CHARS.index("<s>")).all()
        run_quantize(QuantizeJob(out=str(tmp_path / "q2"), bos=False, **job))
        assert not (seen[-1][:, 0] == CHARS.index("<s>")).any()
        ev = run_eval(str(src), str(tmp_path / "calib.txt"), seq_len=32, max_tokens=200)
        ev_no = run_eval(str(src), str(tmp_path / "calib.txt"), seq_len=32, max_tokens=200, bos=False)
    finally:
        progress._reporter = before
    assert "start with BOS (token 1)" in log.getvalue()
    assert ev.result.bos_id == 1 and ev.result.n_tokens == 200 and ev_no.result.bos_id is None
    assert ev.result.ppl != ev_no.result.ppl
    ids = torch.arange(10, 60)
    train, held = split_tokens(ids, 16, 8, bos_id=1)
    assert torch.equal(held, torch.tensor([[1, *range(46, 53)], [1, *range(53, 60)]])) and torch.equal(train, ids[:36])
    assert torch.equal(training_windows(train, 8, bos_id=1)[1], torch.tensor([1, *range(17, 24)]))
