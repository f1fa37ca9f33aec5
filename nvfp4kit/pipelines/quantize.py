"""The ``nvfp4kit quantize`` job: load a model, calibrate and quantize it, write a checkpoint.

The algorithm is :mod:`nvfp4kit.calibrate.ptq` (plan, calibrate, quantize); models come from
:mod:`nvfp4kit.pipelines.models`; checkpoints are written by :mod:`nvfp4kit.checkpoint`. This module
only wires them together for one job (:class:`QuantizeJob`), and holds the job's option defaults.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import progress
from ..calibrate.data import calibration_samples
from ..calibrate.kv_cache import check_kv_cache_format
from ..calibrate.moe import unfuse_experts
from ..calibrate.ptq import DEFAULT_SCHEME, QuantizeResult, quantize_model
from ..calibrate.weight_scales import DEFAULT_WEIGHT_SCALE
from ..checkpoint.quantized import MODELOPT
from .models import CAUSAL_LM, LoadedModel, check_sequence_length, load_source_model


@dataclass
class QuantizeJob:
    model: str | None = None
    out: str = "nvfp4kit-out"
    format: str = MODELOPT
    scheme: str = DEFAULT_SCHEME
    weight_scale: str = DEFAULT_WEIGHT_SCALE
    calib: str | None = None
    calib_samples: int = 64
    seq_len: int = 256
    exclude: tuple[str, ...] = ()
    recipe: str | None = None
    overwrite: bool = False
    bits_budget: float | None = None  # with scheme "mixed": search formats per Linear under this budget
    kv_cache: str | None = None  # "fp8": calibrate static FP8 KV-cache scales too
    sequential: bool = False  # calibrate block by block on the outputs of the quantized blocks before


def save_checkpoint(result: QuantizeResult, loaded: LoadedModel, out: str | os.PathLike, fmt: str,
                    overwrite: bool = False) -> Path:
    """Write ``result.qmodel`` with the tokenizer and generation config of the source model, and the
    files a source folder carries beside its weights (model card, licence, sentence-transformers
    modules such as ``1_Pooling``)."""
    from ..checkpoint import save_quantized
    from ..checkpoint.writer import copy_companion_files

    staging = Path(tempfile.mkdtemp(prefix="nvfp4kit-src-"))
    try:
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(staging))
        gen = getattr(loaded.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(staging))
        if Path(loaded.source).is_dir():
            copy_companion_files(loaded.source, staging)
        result.qmodel.source_dir = str(staging)
        return Path(save_quantized(result.qmodel, out, format=fmt, overwrite=overwrite))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_quantize(job: QuantizeJob, loaded: LoadedModel | None = None) -> tuple[QuantizeResult, Path]:
    """Load, calibrate, quantize and write; returns the result and the checkpoint folder."""
    t_start = time.perf_counter()
    check_kv_cache_format(job.kv_cache)
    prepare_output_dir(job.out, job.overwrite)
    loaded = loaded or load_source_model(job.model)
    samples = None
    needs_calib = job.scheme != "w4a16" or job.weight_scale == "gptq" or job.kv_cache is not None
    if needs_calib:
        check_sequence_length(loaded.model, job.seq_len)
        if loaded.tokenizer is None:
            raise ValueError(f"--model {loaded.source!r} has no tokenizer files, needed to tokenize the calibration text")
        samples = calibration_samples(loaded.tokenizer, job.calib, job.calib_samples, job.seq_len)
        if samples.shape[0] < job.calib_samples:
            progress.log(f"calibration text gave {samples.shape[0]} samples of {job.seq_len} tokens "
                         f"(asked for {job.calib_samples})")
    plan = search = None
    if job.bits_budget is not None:
        if loaded.task != CAUSAL_LM:
            raise ValueError(f"--bits-budget measures each Linear's sensitivity on next-token predictions; "
                             f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}): "
                             "use --scheme w4a4/w4a16/fp8 with --exclude instead")
        plan, search = _searched_plan(job, loaded.model, samples)
    result = quantize_model(loaded.model, samples, job.scheme, job.weight_scale, job.exclude, job.recipe, plan=plan,
                            kv_cache=job.kv_cache, sequential=job.sequential)
    t0 = time.perf_counter()
    path = save_checkpoint(result, loaded, job.out, job.format, job.overwrite)
    if search is not None:
        search.save(path / "mixed_precision.json")
    result.seconds["write"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    return result, path


def _searched_plan(job: QuantizeJob, model: nn.Module, samples: torch.Tensor):
    """The ``--scheme mixed --bits-budget B`` plan: per-Linear formats from the sensitivity search."""
    from ..calibrate.mixed import ptq_precision_plan, report_plan

    if job.scheme != "mixed":
        raise ValueError(f"--bits-budget chooses formats per Linear: use it with --scheme mixed, not {job.scheme!r}")
    if job.recipe is not None:
        raise ValueError("--bits-budget and --recipe both choose the precision map: give one of them")
    unfuse_experts(model)  # the search and the quantizer must see the same Linear names
    plan, search = ptq_precision_plan(model, samples, job.bits_budget, job.exclude)
    report_plan(search)
    return plan, search


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before any work if ``out`` cannot be written; create its parent folders (the checkpoint
    itself is written to a temporary folder beside it and renamed when complete)."""
    from ..checkpoint.writer import check_output_dir

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    return check_output_dir(out, overwrite)


def run_streaming(job: QuantizeJob) -> Path:
    """Weight-only quantization one tensor at a time (no model in memory, no calibration)."""
    from ..checkpoint import quantize_checkpoint

    if job.scheme not in ("w4a16", "fp8"):
        raise ValueError(f"--weights-only-streaming writes weight-only checkpoints: use --scheme w4a16 or fp8, "
                         f"not {job.scheme!r}")
    if job.kv_cache is not None:
        raise ValueError("--kv-cache needs calibration passes through the model; it does not combine with "
                         "--weights-only-streaming")
    if job.weight_scale != "max":
        progress.log(f"streaming mode quantizes weights with max scales (no calibration); "
                     f"--weight-scale {job.weight_scale} does not apply")
    if job.model is None or not Path(job.model).is_dir():
        raise ValueError("--weights-only-streaming needs --model pointing at a safetensors model folder")
    prepare_output_dir(job.out, job.overwrite)
    return Path(quantize_checkpoint(job.model, job.out, "nvfp4" if job.scheme == "w4a16" else "fp8",
                                    job.exclude, format=job.format, overwrite=job.overwrite))
