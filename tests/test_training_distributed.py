"""Data parallel training: ``torchrun --nproc-per-node 2 -m nvfp4kit.cli train`` on CPU (gloo, FSDP2)
gives the loss curve of one process with the same global batch.

Tolerance: the ranks quantize with the global amax of the whole batch (reduced across ranks), and
1x16 blocks never span two sequences, so without stochastic rounding every quantized operand equals
the single-process one and only float32 summation order differs (relative loss difference < 1e-4).
With stochastic rounding each rank draws its own random numbers, so the curves agree to the SR
noise: relative difference < 1% over the first steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_training_loop import MINI, _texts

pytestmark = pytest.mark.slow


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i, t in enumerate(_texts()):
        (d / f"{i}.txt").write_text(t)
    return d


def _args(data, out, flags):
    sets = [a for k, v in MINI.items() for a in ("--model-set", f"{k}={json.dumps(v)}")]
    fl = [a for f in flags for a in ("--flag", f)]
    return ["train", *sets, *fl, "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1", "--eval-every", "3", "--ckpt-every", "3", "--autocast", "off"]


def _losses(out):
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    return [r["loss"] for r in rows], rows[-1]["val_loss"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return env


@pytest.mark.parametrize("flags,tol", [(("no-sr",), 1e-4), ((), 1e-2)])
def test_two_ranks_match_one_process(tmp_path, flags, tol):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    data = _corpus(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "nvfp4kit.cli", *_args(data, one, flags)], env=_env(),
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                         "-m", "nvfp4kit.cli", *_args(data, two, flags)],
                        env=_env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-4000:])
    summary = json.loads((two / "metrics.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["run"]["parallel"] in ("fsdp2", "ddp")
    l1, v1 = _losses(one)
    l2, v2 = _losses(two)
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert abs(a - b) / a < tol, (l1, l2)
    assert abs(v1 - v2) / v1 < tol
    assert (two / "checkpoints" / "step_00000003" / "model.safetensors").is_file()


def test_two_ranks_resume_where_they_stopped(tmp_path):
    """Two ranks stopped after 2 of 4 steps and started again give the uninterrupted run's losses and weights,
    bit for bit (FSDP2-sharded optimizer state, per-rank RNG, data position all restored)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    from safetensors.torch import load_file

    data = _corpus(tmp_path)

    def torchrun(out, *extra):
        args = _args(data, out, ())
        args[args.index("--steps") + 1] = "4"
        args[args.index("--ckpt-every") + 1] = "2"
        args[args.index("--eval-every") + 1] = "2"
        r = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(29600 + os.getpid() % 1000),
                            "-m", "nvfp4kit.cli", *args, *extra], env=_env(), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])

    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(full)
    torchrun(part, "--stop-after", "2")
    assert len(json.loads((part / "metrics.json").read_text())["rows"]) == 2
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    torchrun(part)
    rows_full = json.loads((full / "metrics.json").read_text())["rows"]
    rows_part = json.loads((part / "metrics.json").read_text())["rows"]
    assert [r["step"] for r in rows_part] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_part] == [r["loss"] for r in rows_full]
    assert [r["val_loss"] for r in rows_part] == [r["val_loss"] for r in rows_full]
    a = load_file(str(full / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
