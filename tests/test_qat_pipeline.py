"""The ``nvfp4kit qat`` job end to end on a tiny random model: training, resume, export, CLI."""

import json
import shutil

import pytest
import torch

from nvfp4kit.pipelines.models import load_causal_lm
from nvfp4kit.pipelines.qat import QATJob, run_qat, split_tokens, train_config, training_windows
from nvfp4kit.training.loop import lr_at

import tokenizers
import transformers

TEXT = " ".join(
    "the quick brown fox jumps over the lazy dog while a small model learns to count one two three four five "
    "six seven eight nine ten and the fox runs back".split() * 60
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, initializer_range=0.1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    (d / "train.txt").write_text(TEXT)
    return d


def _job(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), data=str(tiny_dir / "train.txt"), out=str(out), steps=4, lr=3e-3, warmup=1,
                seq_len=32, batch_size=2, calib_samples=2, eval_tokens=64, save_every=2)
    base.update(kw)
    return QATJob(**base)


def test_windows_and_schedule():
    toks = torch.arange(1000)
    w = training_windows(toks, 16)
    assert w.shape == (62, 16) and torch.equal(w.reshape(-1), toks[:992])  # non-overlapping, in order
    with pytest.raises(ValueError, match="fewer than one window"):
        training_windows(toks[:10], 16)
    train, ev = split_tokens(toks, 100, 16)
    assert ev.shape == (6, 16) and train.numel() == 1000 - 96 and int(ev[0, 0]) == 904
    # the training loop's schedule: linear warm-up, then cosine to 10% of the peak exactly at the last step
    cfg = train_config(QATJob(steps=10, warmup=2, lr=1.0), n_eval=1)
    assert [lr_at(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(2, cfg) == 1.0 and all(lr_at(s, cfg) > lr_at(s + 1, cfg) for s in range(2, 9))
    assert (cfg.autocast, cfg.grad_clip, cfg.beta2) == ("off", 0.0, 0.999)


@pytest.mark.parametrize("distill", [False, True])
def test_run_exports_a_checkpoint_that_reads_back(tiny_dir, tmp_path, distill):
    from nvfp4kit.checkpoint import load_quantized

    job = _job(tiny_dir, tmp_path / "out", distill=distill, lr=1e-3 if distill else 3e-3)
    res = run_qat(job)
    assert res.out == tmp_path / "out" and res.tokens_trained == 4 * 2 * 32
    assert res.eval_loss_after is not None and res.loss_last is not None
    q = load_quantized(res.out)
    assert len(q.linears) == 14 and all(r.format == "nvfp4" and r.input_amax > 0 for r in q.linears.values())
    state = tmp_path / "out.qat"
    rows = json.loads((state / "metrics.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == res.loss_last
    assert rows[0]["lr"] == pytest.approx(job.lr) and rows[-1]["lr"] == pytest.approx(0.1 * job.lr)
    assert (state / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    with pytest.raises(FileExistsError, match="already exists"):
        run_qat(job)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    from nvfp4kit.checkpoint import load_quantized

    full = run_qat(_job(tiny_dir, tmp_path / "a"))
    # interrupted after step 2: only the step-2 checkpoint and no export
    run_qat(_job(tiny_dir, tmp_path / "b"))
    shutil.rmtree(tmp_path / "b")
    ck = tmp_path / "b.qat" / "checkpoints"
    shutil.rmtree(ck / "step_00000004")
    (ck / "latest").write_text("step_00000002\n")
    with pytest.raises(FileExistsError, match="--resume"):
        run_qat(_job(tiny_dir, tmp_path / "b"))
    resumed = run_qat(_job(tiny_dir, tmp_path / "b", resume=True))
    assert resumed.loss_last == full.loss_last
    qa, qb = load_quantized(tmp_path / "a"), load_quantized(tmp_path / "b")
    for n in qa.linears:
        assert torch.equal(qa.linears[n].nvfp4.packed, qb.linears[n].nvfp4.packed)
    with pytest.raises(ValueError, match="different run configuration"):
        shutil.rmtree(tmp_path / "b")
        run_qat(_job(tiny_dir, tmp_path / "b", resume=True, lr=1e-4))


def test_export_evaluates_like_the_trained_model(tiny_dir, tmp_path):
    """The written checkpoint, run through the evaluation emulation, gives the trained model's logits."""
    from nvfp4kit.calibrate import emulation
    from nvfp4kit.calibrate.qat import prepare_qat, calibrate_input_amax, export_quantized_model
    from nvfp4kit.checkpoint import load_quantized, save_quantized

    model, _ = load_causal_lm(tiny_dir)
    prepare_qat(model)
    ids = torch.randint(0, 32, (1, 32), generator=torch.Generator().manual_seed(0))
    calibrate_input_amax(model, [ids])
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(export_quantized_model(model), tmp_path / "ck")
    fresh, _ = load_causal_lm(tiny_dir)
    emulation.apply_quantized(fresh, load_quantized(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_bad_options(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--scheme"):
        run_qat(_job(tiny_dir, tmp_path / "x", scheme="w8a8"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_qat(_job(tiny_dir, tmp_path / "x", model=str(tmp_path / "nope")))
    assert not (tmp_path / "x").exists()


def test_cli(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from nvfp4kit.cli.app import app
    import nvfp4kit.cli.qat_cmd  # noqa: F401  (registers the command)

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["qat", "--model", str(tiny_dir), "--data", str(tiny_dir / "train.txt"),
                                 "--steps", "2", "--seq-len", "32", "--calib-samples", "2", "--eval-tokens", "64",
                                 "--lr", "1e-3", "--distill", "--out", str(out), "--format", "compressed-tensors"])
    assert r.exit_code == 0, r.output
    assert "QAD" in r.output and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    r = CliRunner().invoke(app, ["qat", "--model", str(tiny_dir), "--out", str(tmp_path / "y"), "--scheme", "int2"])
    assert r.exit_code != 0 and "--scheme" in r.output


def test_qat_from_a_ptq_checkpoint_keeps_its_formats_and_input_scales(tiny_dir, tmp_path):
    from nvfp4kit.calibrate.qat import calibrate_input_amax, export_quantized_model, prepare_qat
    from nvfp4kit.checkpoint import load_quantized, save_quantized

    model, _ = load_causal_lm(tiny_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    formats = {n: ("fp8" if n.endswith("o_proj") else "nvfp4") for n in names}
    prepare_qat(model, formats)
    calibrate_input_amax(model, [torch.randint(0, 32, (1, 32), generator=torch.Generator().manual_seed(1))])
    save_quantized(export_quantized_model(model), tmp_path / "ptq")
    ptq = load_quantized(tmp_path / "ptq")
    res = run_qat(_job(tiny_dir, tmp_path / "qat", steps=2, ptq=str(tmp_path / "ptq"), save_every=0))
    out = load_quantized(res.out)
    assert {n: r.format for n, r in out.linears.items()} == formats
    for n, r in out.linears.items():
        assert r.input_amax == pytest.approx(ptq.linears[n].input_amax, rel=1e-6)


def test_qat_job_on_a_nemotron_hybrid_checkpoint(tmp_path):
    """`nvfp4kit qat --model` takes a Nemotron 3 hybrid folder too (loaded with nvfp4kit's model); the
    exported checkpoint holds NVFP4 records for the quantizable Linears, and none for the default exclusions."""
    from nvfp4kit.checkpoint import load_quantized
    from nvfp4kit.model import build_model
    from nvfp4kit.model.io import save_pretrained

    src = tmp_path / "hybrid"
    m = build_model("micro", seed=1)
    save_pretrained(m, src)
    chars = [chr(i) for i in range(32, 127)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(src))
    (tmp_path / "train.txt").write_text(TEXT)
    model, _ = load_causal_lm(str(src))
    assert type(model).__name__ == "NemotronForCausalLM"
    res = run_qat(QATJob(model=str(src), data=str(tmp_path / "train.txt"), out=str(tmp_path / "out"), steps=2,
                         lr=1e-3, warmup=1, seq_len=32, batch_size=1, calib_samples=2, eval_tokens=64,
                         save_every=2, distill=True))
    q = load_quantized(res.out)
    assert q.linears and all(r.format == "nvfp4" for r in q.linears.values())
    assert not any(n.startswith("mtp.") or n == "lm_head" for n in q.linears)
