"""``bench/gpu_check.sh --dry-run``: the device check's every step, on the CPU with tiny sizes, into a temp
file (never bench/RESULTS.md), so the script is known to work before a GPU is spent on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
RESULTS = ROOT / "bench" / "RESULTS.md"


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_runs_every_step_into_a_temp_file(tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    out = tmp_path / "gpu-check.md"
    res = _run("--dry-run", "--results", str(out))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    text = out.read_text()
    assert text.count("<!-- begin gpu-check -->") == 1 and "<!-- end gpu-check -->" in text
    assert "Device: **dry run on the CPU" in text
    for title in ("### CUDA tests", "### Kernels vs device copy", "### Training step", "### PTQ calibration"):
        assert title in text, title
    assert "**passed**" in text and "every step passed" in text and "FAILED" not in text
    for recipe in ("| bf16 |", "| nemotron3 |", "| all-nvfp4 |", "| max |", "| gptq |"):
        assert recipe in text, recipe
    assert "| quantize 1x16, amax given (fused kernel) |" in text and "| NO |" not in text
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before  # the real results are untouched


def _driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refusals_name_the_fix(tmp_path, capsys):
    drv = _driver()
    for argv, message in (
        (["--dry-run", "--results", str(RESULTS)], "never writes bench/RESULTS.md"),
        (["--dry-run", "--steps", "tests,typo", "--results", str(tmp_path / "x.md")], "unknown step(s) typo"),
    ) + (([], "use --dry-run"),) * (not torch.cuda.is_available()):
        with pytest.raises(SystemExit) as e:
            drv.main(argv)
        assert e.value.code != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
