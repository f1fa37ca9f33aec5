"""Training loop: schedule, data packing and loader, checkpoints, exact resume, metrics, CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nvfp4kit.pipelines.train import TrainOptions, run_training
from nvfp4kit.training.data import ByteTokenizer, PackedLoader, pack, tokenize_files, tokenize_texts
from nvfp4kit.training.loop import TrainConfig, lr_at

# a small hybrid (Mamba, attention, LatentMoE, MLP, MTP) that trains in well under a second a step
MINI = dict(
    hidden_size=64, hybrid_override_pattern="M*E-E", num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
    moe_shared_expert_intermediate_size=64,
)


def _texts():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:60]]


def _opts(out, **kw):
    cfg = kw.pop("train", None) or TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup=2,
                                               eval_every=2, eval_sequences=8, ckpt_every=2)
    return TrainOptions(out=str(out), preset="tiny", recipe=kw.pop("recipe", "nemotron3"), texts=_texts(),
                        train=cfg, model_overrides=MINI, show_recipe=False, **kw)


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_cosine_and_wsd():
    cfg = TrainConfig(steps=101, lr=1.0, min_lr_ratio=0.1, warmup=10)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg) == pytest.approx(1.0)
    for s in range(10, 101):
        frac = (s - 10) / 90
        assert lr_at(s, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    w = TrainConfig(steps=100, lr=2.0, min_lr_ratio=0.0, warmup=0, schedule="wsd", wsd_decay_fraction=0.2)
    assert all(lr_at(s, w) == 2.0 for s in range(80))
    assert [lr_at(s, w) for s in (80, 89, 99)] == pytest.approx([2.0 - 2.0 / 20, 2.0 - 2.0 * 10 / 20, 0.0])
    with pytest.raises(ValueError, match="--schedule"):
        TrainConfig(schedule="linear").validate()


# ----------------------------------------------------------------------------- data


def test_byte_tokenizer_and_files_match_texts(tmp_path):
    tok = ByteTokenizer()
    s = "héllo, wörld\n"
    assert tok.decode(tok.encode(s)) == s and max(tok.encode(s)) < 256
    docs = ["first document\nline two", "second ünïcode document"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    from_files = tokenize_files([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], tok)
    expected = list(docs[0].encode()) + [256] + list(docs[1].encode()) + [256]
    assert from_files.tolist() == expected
    assert tokenize_texts(docs, tok).tolist() == expected


def test_pack_split_and_loader_positions():
    tokens = torch.arange(1000)
    d = pack(tokens, 10, val_fraction=0.1, split_seed=5)
    assert d.train.shape == (90, 10) and d.val.shape == (10, 10)
    rows = torch.cat([d.train, d.val])
    assert sorted(rows[:, 0].tolist()) == list(range(0, 1000, 10))  # disjoint, complete
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 10)) for r in rows)
    a = PackedLoader(d.train, 8, seed=3)
    seen = [a.next() for _ in range(25)]  # crosses an epoch boundary (11 batches an epoch)
    first_epoch = torch.cat(seen[:11])[:, 0].tolist()
    assert len(set(first_epoch)) == 88  # no repeats inside an epoch
    b = PackedLoader(d.train, 8, seed=3)
    for _ in range(13):
        b.next()
    c = PackedLoader(d.train, 8, seed=3)
    c.load_state(b.state())
    assert all(torch.equal(c.next(), s) for s in seen[13:])
    # two ranks split each global batch
    r0, r1 = PackedLoader(d.train, 8, seed=3, rank=0, world=2), PackedLoader(d.train, 8, seed=3, rank=1, world=2)
    for s in seen[:5]:
        assert torch.equal(torch.cat([r0.next(), r1.next()]), s)
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(d.train, 7, world=2)
    with pytest.raises(ValueError, match="fewer than one training sequence"):
        pack(torch.arange(5), 10)


# ----------------------------------------------------------------------------- end to end


def test_train_writes_metrics_checkpoints_and_resumes_exactly(tmp_path):
    full = run_training(_opts(tmp_path / "full"))
    rows = json.loads((tmp_path / "full" / "metrics.json").read_text())["rows"]
    assert [r["step"] for r in rows] == list(range(1, 5))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [2, 4]
    assert full["final"]["step"] == 4
    with open(tmp_path / "full" / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in csv_rows] == [r["loss"] for r in rows]
    assert (tmp_path / "full" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = tmp_path / "full" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]  # no temp left
    ck = root / "step_00000004"
    model_sd = load_file(str(ck / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in model_sd.values())  # FP32 master weights
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert any(k.endswith("/exp_avg_sq") for k in opt)
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 4 and state["data"]["position"] > 0
    assert "cpu.rank0" in load_file(str(ck / "rng.safetensors"))

    # stop after 3 steps, then resume in a fresh call: same losses, bit for bit
    part = tmp_path / "part"
    run_training(_opts(part, stop_after=3))
    assert json.loads((part / "checkpoints" / "step_00000003" / "state.json").read_text())["step"] == 3
    assert len(json.loads((part / "metrics.json").read_text())["rows"]) == 3
    run_training(_opts(part))
    resumed = json.loads((part / "metrics.json").read_text())["rows"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in rows]
    final_a = load_file(str(root / "step_00000004" / "model.safetensors"))
    final_b = load_file(str(part / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_refuses_a_different_model(tmp_path):
    run_training(_opts(tmp_path, train=TrainConfig(steps=1, batch_size=2, seq_len=32, eval_every=0, ckpt_every=1)))
    other = _opts(tmp_path, train=TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=0, ckpt_every=1))
    other.model_overrides = dict(MINI, hidden_size=96)
    with pytest.raises((ValueError, RuntimeError)):
        run_training(other)


def test_cli_train(tmp_path):
    from nvfp4kit.cli.main import app

    data = tmp_path / "corpus"
    data.mkdir()
    for i, t in enumerate(_texts()[:20]):
        (data / f"{i}.txt").write_text(t)
    runner = CliRunner()
    sets = [a for k, v in MINI.items() for a in ("--model-set", f"{k}={json.dumps(v)}")]
    res = runner.invoke(app, ["train", *sets, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
                              "--batch-size", "2", "--seq-len", "32", "--recipe", "all-nvfp4", "--flag", "no-rht",
                              "--eval-every", "2", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "done: step 2" in res.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["recipe"] == "all-nvfp4" and run["flags"] == ["no-rht"]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    precs = summary["run"]["precisions"]
    assert precs["lm_head"] == "bf16" and any(v == "nvfp4[2d,sr]" for v in precs.values())
    bad = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "missing" in bad.output
    bad = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--flag", "turbo"])
    assert bad.exit_code != 0 and "unknown recipe flag" in bad.output
