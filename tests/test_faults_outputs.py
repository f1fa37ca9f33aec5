"""Faults around outputs: an output that is, contains or lies inside a source is refused by every writer;
a new training run never mixes with an earlier one; a truncated training checkpoint is named and skipped
for the newest complete one; what a killed run left (temporary folders of dead processes) is removed by
the next run, while a resumable block-by-block staging folder is kept and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from nvfp4kit import progress, scratch
from nvfp4kit.checkpoint import CheckpointError, ShardedWriter
from nvfp4kit.checkpoint.staged import StagedCheckpoint, staging_dir
from nvfp4kit.checkpoint.writer import check_apart_from_sources
from nvfp4kit.cli.main import app
from nvfp4kit.pipelines.qat import QATJob, run_qat
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize, run_streaming
from nvfp4kit.pipelines.train import TrainOptions, run_training
from nvfp4kit.training import checkpointing
from nvfp4kit.training.loop import TrainConfig

runner = CliRunner()
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * 40


def flat(output: str) -> str:
    """CLI output with rich's box drawing removed and whitespace (line wrapping) collapsed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative name -> sha1 of its bytes)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The PID of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def logs(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(progress, "log", seen.append)
    return seen


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("src")
    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(
        vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>")), unk_token="<unk>")
    model_dir = root / "M"
    tiny_llama(vocab=128, layers=2, max_positions=128).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (root / "calib").mkdir()
    (root / "calib" / "calib.txt").write_text(TEXT)
    return model_dir


def _job(model: Path, out, **kw) -> QuantizeJob:
    base = dict(model=str(model), out=str(out), calib=str(model.parent / "calib"), calib_samples=2, seq_len=16,
                scheme="w4a4", weight_scale="max", smooth="none")
    base.update(kw)
    return QuantizeJob(**base)


# ----------------------------------------------------------------------------- 1. output vs source


def test_the_rule_is_contains_or_lies_inside_after_resolving_symlinks(tmp_path):
    src = tmp_path / "models" / "M"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    for out, how in ((src, "is"), (src / "sub", "lies inside"), (tmp_path / "models", "contains"),
                     (tmp_path, "contains")):
        with pytest.raises(CheckpointError, match=f"output folder {re.escape(str(out))} {how} the source "
                                                  f"{re.escape(str(src))}"):
            check_apart_from_sources(out, [src])
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(link))} \(really {re.escape(str(src))}\) is the source"):
        check_apart_from_sources(link, [src])
    with pytest.raises(CheckpointError, match="is the source"):  # the source given through a link
        check_apart_from_sources(src, [link])
    # a Hugging Face cache snapshot: the files are links to blobs elsewhere, which are the data
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    snap = tmp_path / "hub" / "snapshots" / "1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / "abc")
    with pytest.raises(CheckpointError, match=rf"contains the source {re.escape(str(snap))} \(really "):
        check_apart_from_sources(blobs, [snap])
    # neighbours that are fine: a sibling sharing the name's start, a source that is not on disk, None
    assert check_apart_from_sources(tmp_path / "models" / "M-NVFP4", [src, None, "org/hub-id", "builtin"]) == \
        tmp_path / "models" / "M-NVFP4"


def test_quantize_refuses_its_source_as_output_and_touches_nothing(llama, tmp_path):
    before = tree_digest(llama.parent)
    cases = [
        (["--out", str(llama), "--overwrite"], f"{llama} is the source {llama}"),
        (["--out", str(llama / "q"), "--overwrite"], f"{llama / 'q'} lies inside the source {llama}"),
        (["--out", str(llama.parent), "--overwrite"], f"{llama.parent} contains the source {llama}"),
        (["--out", str(llama.parent / "calib"), "--overwrite"],
         f"{llama.parent / 'calib'} is the source {llama.parent / 'calib'}"),  # the calibration text too
        (["--out", str(llama), "--overwrite", "--load", "blocks"], f"{llama} is the source {llama}"),
        (["--out", str(llama), "--overwrite", "--weights-only-streaming", "--scheme", "w4a16"],
         f"{llama} is the source {llama}"),
        (["--out", str(llama)], f"{llama} is the source {llama}"),  # said before "already exists"
    ]
    for extra, message in cases:
        r = runner.invoke(app, ["quantize", "--model", str(llama), "--calib", str(llama.parent / "calib"),
                                "--calib-samples", "2", "--seq-len", "16", *extra])
        assert r.exit_code != 0, extra
        assert message in flat(r.output), (extra, r.output)
        assert "Traceback" not in r.output
    assert tree_digest(llama.parent) == before  # nothing written, nothing removed
    assert sorted(p.name for p in llama.parent.iterdir()) == ["M", "calib"]


def test_the_block_writer_and_library_writers_refuse_too(llama, tmp_path):
    with pytest.raises(CheckpointError, match="is the source"):
        StagedCheckpoint(llama, "modelopt", {}, config={}, overwrite=True, sources=(llama,))
    assert not staging_dir(llama).exists()
    with pytest.raises(CheckpointError, match="lies inside the source"):
        ShardedWriter(llama / "x", sources=(llama,))
    with pytest.raises(CheckpointError, match="is the source"):
        run_streaming(_job(llama, llama, scheme="w4a16", overwrite=True))
    assert (llama / "model.safetensors").is_file() and not (llama / "x").exists()


def test_under_torchrun_every_rank_refuses_before_any_work(llama, monkeypatch):
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    before = tree_digest(llama)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(llama))} is the source"):
        run_quantize(_job(llama, llama, load="blocks", overwrite=True, device="cpu"))
    assert not dist.is_initialized()  # the process group was left
    assert tree_digest(llama) == before


def test_qat_refuses_its_source_as_output_or_training_state(llama, tmp_path):
    before = tree_digest(llama.parent)
    with pytest.raises(CheckpointError, match=f"output folder {re.escape(str(llama))} is the source"):
        run_qat(QATJob(model=str(llama), out=str(llama), data=str(llama.parent / "calib"), steps=1, overwrite=True))
    # OUT.qat/ (the training state, cleared by --overwrite) may not be the model either
    state_model = tmp_path / "run.qat"
    shutil.copytree(llama, state_model)
    with pytest.raises(CheckpointError, match=f"training state folder {re.escape(str(state_model))} is the source"):
        run_qat(QATJob(model=str(state_model), out=str(tmp_path / "run"), steps=1, overwrite=True))
    r = runner.invoke(app, ["qat", "--model", str(llama), "--out", str(llama.parent), "--overwrite", "--steps", "1"])
    assert r.exit_code != 0 and f"{llama.parent} contains the source {llama}" in flat(r.output)
    assert tree_digest(llama.parent) == before
    assert (state_model / "model.safetensors").is_file() and not (tmp_path / "run").exists()


def test_convert_refuses_an_output_around_or_inside_its_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(32, 32, generator=g).bfloat16(),
               "model.embed_tokens.weight": torch.randn(16, 32, generator=g).bfloat16()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "q"), "--quantize", "nvfp4"])
    assert r.exit_code == 0, r.output
    before = tree_digest(tmp_path)
    cases = [
        ([str(src), "--out", str(tmp_path), "--quantize", "nvfp4", "--overwrite"], "contains the source"),
        ([str(src), "--out", str(src / "q"), "--quantize", "nvfp4"], "lies inside the source"),
        ([str(tmp_path / "q"), "--out", str(tmp_path / "q" / "bf"), "--to", "bf16"], "lies inside the source"),
        ([str(tmp_path / "q"), "--out", str(tmp_path / "q"), "--to", "compressed-tensors", "--overwrite"],
         "is the source"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["convert", *args])
        assert r.exit_code != 0, args
        assert message in flat(r.output), (args, r.output)
    assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------- training runs

MINI = dict(hidden_size=64, hybrid_override_pattern="M*-", num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16)
TEXTS = [("Sphinx of black quartz, judge my vow. " * 20 + str(i)) for i in range(30)]


def _train(out, steps=2, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_every=0, ckpt_every=1,
                      seed=kw.pop("seed", 0))
    return TrainOptions(out=str(out), preset="tiny", recipe="bf16", texts=TEXTS, train=cfg, model_overrides=MINI,
                        show_recipe=False, **kw)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in json.loads((out / "metrics.json").read_text())["rows"]]


@pytest.fixture(scope="module", autouse=True)
def no_loss_plot():
    """The loss chart (tested elsewhere) is a placeholder here: drawing it is most of a tiny run's time."""
    from nvfp4kit.training import loop

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "plot_loss", lambda rows, path, title="": Path(path).write_bytes(b"png"))
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2, its losses."""
    out = tmp_path_factory.mktemp("run") / "a"
    run_training(_train(out))
    return out, _losses(out)


def _copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "a"
    shutil.copytree(finished_run[0], out)
    return out


def test_a_new_run_in_an_earlier_runs_folder_is_refused_and_nothing_changes(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    before = tree_digest(out)
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(checkpoints, metrics.csv, metrics.json, "
                                              r"loss.png, run.json\).*--overwrite"):
        run_training(_train(out, steps=1, resume=False, seed=1))
    assert tree_digest(out) == before
    r = runner.invoke(app, ["train", "--data", str(out / "metrics.csv"), "--out", str(out), "--no-resume"])
    assert r.exit_code != 0 and "holds an earlier run" in flat(r.output) and "Traceback" not in r.output
    # --overwrite never removes what the run reads
    r = runner.invoke(app, ["train", "--data", str(out / "metrics.csv"), "--out", str(out), "--overwrite"])
    assert r.exit_code != 0
    assert f"run file removed by --overwrite {out / 'metrics.csv'} is the source {out / 'metrics.csv'}" in flat(r.output)
    assert tree_digest(out) == before
    # an empty folder, or one with only an empty checkpoints/ and other files, is no earlier run
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fresh" / "notes.txt").write_text("x")
    assert checkpointing.earlier_run(tmp_path / "fresh") == []


def test_overwrite_removes_the_earlier_run_first_and_the_next_run_resumes_the_new_one(finished_run, tmp_path, logs):
    out = _copy_run(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")  # not a file of the run: kept
    run_training(_train(out, steps=1, resume=False, overwrite=True, seed=1))
    assert any("--overwrite: removed the earlier run" in m for m in logs)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # the old step 2 is gone
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert checkpointing.read_state(root / "step_00000001")["config"]["seed"] == 1
    new = _losses(out)
    assert len(new) == 1 and new != finished_run[1][:1]  # the rows of the new run (seed 1) only
    assert (out / "notes.txt").read_text() == "mine"
    # the next run (resuming, 2 steps) continues the new run from its step 1, not the old run's step 2
    run_training(_train(out, steps=2, seed=1))
    assert _losses(out)[:1] == new and len(_losses(out)) == 2
    assert checkpointing.read_state(root / "step_00000002")["config"]["seed"] == 1


def test_pruning_keeps_the_checkpoint_just_written_and_drops_a_superseded_future(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8):
        (root / f"step_{s:08d}").mkdir(parents=True)
    checkpointing.prune_checkpoints(root, 4, keep=2)  # resumed from step 2 after 6 and 8 were written
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]
    checkpointing.prune_checkpoints(root, 4, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def _cut(file: Path, keep: float = 0.5) -> None:
    """Cut a file short, as a kill -9 or a full disk leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_latest_checkpoint_is_named_and_the_one_before_it_resumed(finished_run, tmp_path, logs):
    out = _copy_run(finished_run, tmp_path)
    bad = out / "checkpoints" / "step_00000002" / "model.safetensors"
    _cut(bad)
    (out / "metrics.json").unlink()
    run_training(_train(out))
    warned = [m for m in logs if str(bad) in m]
    assert warned and "corrupt or truncated" in warned[0] and "resuming from the checkpoint before it" in warned[0]
    assert any("resumed from" in m and "step_00000001" in m for m in logs)
    assert _losses(out) == finished_run[1]  # step 2 again from step 1: the same losses, bit for bit
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    checkpointing.check_complete(out / "checkpoints" / "step_00000002")  # written anew, whole


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_each_file_of_a_checkpoint_is_checked(finished_run, tmp_path, logs, victim):
    out = _copy_run(finished_run, tmp_path)
    step2 = out / "checkpoints" / "step_00000002"
    assert checkpointing.latest_checkpoint(out, warn=True) == step2 and logs == []
    _cut(step2 / victim)
    assert checkpointing.latest_checkpoint(out, warn=True) == out / "checkpoints" / "step_00000001"
    assert len(logs) == 1 and f"checkpoint file {step2 / victim} is corrupt or truncated" in logs[0]
    (step2 / victim).unlink()
    assert checkpointing.latest_checkpoint(out) == out / "checkpoints" / "step_00000001"
    with pytest.raises(checkpointing.TrainingCheckpointError, match=f"checkpoint file {re.escape(str(step2 / victim))} "
                                                                    "is missing"):
        checkpointing.check_complete(step2)


def test_no_complete_checkpoint_is_a_clear_error(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    for step in (1, 2):
        _cut(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    with pytest.raises(checkpointing.TrainingCheckpointError,
                       match=r"no complete checkpoint in .*checkpoints to resume from: checkpoint file "
                             r".*step_00000002/model.safetensors is corrupt or truncated.*step_00000001/model"):
        run_training(_train(out))
    # loading one directly names the file and leaves the model as it was
    from nvfp4kit.pipelines.train import build_training_model
    from nvfp4kit.training.loop import make_optimizer

    model = build_training_model(_train(out), 257)
    opt = make_optimizer(model, _train(out).train)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpointing.TrainingCheckpointError, match=r"step_00000001/model.safetensors is corrupt"):
        checkpointing.load_checkpoint(out / "checkpoints" / "step_00000001", model, opt)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- 10. what killed runs leave


def test_owner_tags_and_which_are_stale(tmp_path):
    me, dead, host = os.getpid(), dead_pid(), scratch.host_id()
    assert scratch.owned(".x.tmp-") == f".x.tmp-pid{me}-{host}"
    assert scratch.owner(f".out.partial-pid{dead}-{host}-k2j3") == (dead, host)
    assert scratch.owner(".out.partial") is None and scratch.owner(f".out.partial-pid{dead}-{host}x") is None
    assert scratch.is_stale(f".out.partial-pid{dead}-{host}-k2j3")
    assert not scratch.is_stale(f".out.partial-pid{me}-{host}-k2j3")  # alive
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    assert not scratch.is_stale(f".out.partial-pid{dead}-{other}-k2j3")  # another host's: never guessed
    names = [f".a.partial-pid{dead}-{host}-1", f".b.partial-pid{dead}-{host}-2", f".a.partial-pid{me}-{host}-3",
             f".a.partial-pid{dead}-{other}-4", ".a.partial", "a", f"a.partial-pid{dead}-{host}-5"]
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / f".a.partial-pid{dead}-{host}-1" / "shard.safetensors").write_bytes(b"x")
    removed = scratch.remove_stale(tmp_path, ".*.partial-pid*")
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


KILLED_WRITER = textwrap.dedent('''
    import sys, time, torch
    from nvfp4kit.checkpoint import ShardedWriter
    with ShardedWriter(sys.argv[1], max_shard_bytes=1000) as w:
        w.add("a", torch.zeros(1000))
        w.add("b", torch.zeros(1000))   # the first shard is on disk now
        print("written", flush=True)
        time.sleep(600)
''')


def test_a_writer_killed_with_sigkill_leaves_a_partial_folder_the_next_writer_removes(tmp_path, logs):
    out = tmp_path / "ckpt"
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert p.stdout.readline().strip() == "written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    left = [q for q in tmp_path.iterdir() if q.name.startswith(".ckpt.partial-")]
    assert len(left) == 1 and scratch.owner(left[0].name) == (p.pid, scratch.host_id())
    assert list(left[0].glob("*.safetensors")) and not out.exists()
    (tmp_path / ".ckpt.partial").mkdir()  # a resumable staging folder (no owner): never touched
    with ShardedWriter(out) as w:
        w.add("c", torch.ones(4))
    assert sorted(q.name for q in tmp_path.iterdir()) == [".ckpt.partial", "ckpt"]
    assert any(str(left[0]) in m and f"process {p.pid}" in m for m in logs)


def test_a_killed_training_runs_temporary_checkpoints_are_removed(finished_run, tmp_path, logs):
    out = _copy_run(finished_run, tmp_path)
    dead, root = dead_pid(), out / "checkpoints"
    stale = [root / f".step_00000003.tmp-{scratch.owner_tag(dead)}", root / f".step_00000002.old-{scratch.owner_tag(dead)}"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    stale_files = [root / f".latest.tmp-{scratch.owner_tag(dead)}", out / f".metrics.json.tmp-{scratch.owner_tag(dead)}"]
    for f in stale_files:
        f.write_text("x")
    live = root / f".step_00000009.tmp-{scratch.owner_tag(os.getppid())}"  # a live process's: kept
    live.mkdir()
    run_training(_train(out, steps=3))
    assert not any(p.exists() for p in stale + stale_files)
    assert live.is_dir()
    assert (root / "latest").read_text().strip() == "step_00000003"


def test_stale_staging_under_the_system_temp_folder_is_removed(llama, tmp_path, monkeypatch, logs):
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = dead_pid()
    stale = tmp / f"nvfp4kit-src-{scratch.owner_tag(dead)}-abc"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    live = tmp / f"nvfp4kit-src-{scratch.owner_tag()}-def"
    live.mkdir()
    foreign = tmp / "nvfp4kit-src-abc"  # no owner (another tool, an older version): kept
    foreign.mkdir()
    out = llama.parent.parent / f"{llama.parent.name}-M-NVFP4"  # beside the sources, a name sharing their start
    _, path = run_quantize(_job(llama, out, scheme="w4a16", load="whole"))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, foreign.name])  # its own staging is gone too
    shutil.rmtree(out)


def test_block_by_block_resume_survives_the_cleanup_of_what_a_killed_run_left(llama, tmp_path, monkeypatch, logs):
    from nvfp4kit.checkpoint import staged

    out = tmp_path / "cut"
    real = staged.StagedCheckpoint.end_unit

    def stop_after_block_0(self, unit, state):
        real(self, unit, state)
        if unit == 1:
            raise KeyboardInterrupt  # as if killed after the first block was staged

    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(_job(llama, out, load="blocks", activation_memory=0))
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", real)
    stage = staging_dir(out)
    assert json.loads((stage / "manifest.json").read_text())["units"] == 2
    # what a kill -9 leaves besides: a writer's partial folder, a half-written manifest, spilled activations
    dead = scratch.owner_tag(dead_pid())
    beside = tmp_path / f".cut.partial-{dead}-x1"
    beside.mkdir()
    half = stage / f".manifest.json.tmp-{dead}"
    half.write_text("{")
    spill = stage / "spill" / f"inputs-{dead}-y2"
    spill.mkdir(parents=True)
    (spill / "000000.safetensors").write_bytes(b"x")
    ran = []
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", lambda self, u, s: (ran.append(u), real(self, u, s)))
    _, path = run_quantize(_job(llama, out, load="blocks", activation_memory=0))
    assert ran == [2, 3]  # block 0 was kept and not computed again: the run resumed
    assert any("resuming" in m for m in logs)
    assert not beside.exists() and not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]
    whole = tmp_path / "whole"
    run_quantize(_job(llama, whole, load="blocks", activation_memory=0))
    assert tree_digest(whole) == tree_digest(path)  # the resumed checkpoint is the uninterrupted one
