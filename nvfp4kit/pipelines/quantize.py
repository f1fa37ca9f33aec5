"""The ``nvfp4kit quantize`` job: load a model, calibrate and quantize it, write a checkpoint.

Two ways through the same algorithm (:mod:`nvfp4kit.calibrate`), chosen by ``load``:

* ``whole``: the model is loaded into memory and quantized there (:func:`~nvfp4kit.calibrate.ptq.quantize_model`,
  one-shot calibration by default);
* ``blocks``: the model is built on the meta device and quantized block by block from disk
  (:func:`~nvfp4kit.calibrate.blockwise.quantize_by_block`, sequential calibration by default): the memory
  peak is one block, the calibration activations and one output shard, whatever the depth. The checkpoint
  is staged unit by unit beside the output (:class:`~nvfp4kit.checkpoint.staged.StagedCheckpoint`), so an
  interrupted run resumes when the same command runs again; under ``torchrun`` the ranks share the
  calibration samples and rank 0 writes.
* ``auto`` (the default) loads whole when the model fits comfortably in the device's memory, else by block.

On a model that fits, both give the same checkpoint bytes for the same calibration semantics. Models come
from :mod:`nvfp4kit.pipelines.models`; this module wires the parts together for one job
(:class:`QuantizeJob`) and holds the job's option defaults.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import progress, scratch
from ..calibrate.activations import ActivationStore
from ..calibrate.blockwise import ResumeState, quantize_by_block
from ..calibrate.data import calibration_samples, sample_bos
from ..calibrate.kv_cache import attention_modules, check_kv_cache_format
from ..calibrate.moe import unfuse_experts
from ..calibrate.ptq import DEFAULT_SCHEME, QuantizeResult, check_plan, check_weight_scale, plan_model, quantize_model
from ..calibrate.records import config_dict
from ..calibrate.sequential import block_layout
from ..calibrate.transforms import DEFAULT_ROTATE, DEFAULT_SMOOTH, Transforms, check_smoothing, has_smoothing_groups
from ..calibrate.weight_scales import DEFAULT_WEIGHT_SCALE
from ..checkpoint.quantized import MODELOPT, declare_dtype
from ..checkpoint.staged import SPILL
from ..checkpoint.writer import check_apart_from_sources
from ..checkpoint.types import QuantizedModel
from ..devices import available_memory, resolve_device, resolve_dtype
from ..policy import check_scheme
from .models import (CAUSAL_LM, LoadedModel, check_sequence_length, embedded_model_path, load_source_model,
                     open_by_block)

LOAD_MODES = ("auto", "whole", "blocks")
METHODS = ("given", "auto")
# a whole model is loaded when its weights take at most this share of the free memory
WHOLE_MODEL_SHARE = 0.5
# default activation memory per store: this share of the free memory (the rest of them spills to disk)
ACTIVATION_SHARE = 0.15


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
    kv_cache: str | None = None  # "fp8" / "nvfp4": calibrate static FP8 / NVFP4 KV-cache scales too
    sequential: bool | None = None  # None: the way's default (one-shot whole, sequential by block)
    load: str = "auto"  # "auto", "whole" or "blocks"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, float16
    activation_memory: float | None = None  # GB of calibration activations kept in memory by block (None: auto)
    max_shard_size: str = "5GB"
    bos: bool = True  # calibration samples start with the tokenizer's BOS when it adds one
    smooth: str = DEFAULT_SMOOTH  # per-channel smoothing before quantization: awq | smoothquant | none
    rotate: bool = DEFAULT_ROTATE  # the offline Hadamard rotation of the residual stream and of v/o
    method: str = "given"  # "given": the options above; "auto": try the candidate recipes, keep the best

    def transforms(self) -> Transforms:
        return Transforms(rotate=self.rotate, smooth=self.smooth)


def save_checkpoint(result: QuantizeResult, loaded: LoadedModel, out: str | os.PathLike, fmt: str,
                    overwrite: bool = False, max_shard_size="5GB", sources=()) -> Path:
    """Write ``result.qmodel`` with the tokenizer and generation config of the source model, and the
    files a source folder carries beside its weights (model card, licence, sentence-transformers
    modules such as ``1_Pooling``); unquantized tensors in the source checkpoint's own dtype. ``out`` must
    not be, contain or lie inside ``loaded.source`` or any of ``sources``."""
    from ..checkpoint import save_quantized

    sources = (loaded.source, *sources)
    check_apart_from_sources(out, sources)
    staging = scratch.system_temp_dir("src")
    try:
        stage_companions(staging, loaded.tokenizer, getattr(loaded.model, "generation_config", None), loaded.source)
        result.qmodel.source_dir = str(staging)
        # unquantized tensors in the source's own dtype: they came from it, so the cast is exact
        tensor_dtype = loaded.source_dtype
        result.qmodel.config = declare_dtype(result.qmodel.config, tensor_dtype)
        return Path(save_quantized(result.qmodel, out, format=fmt, overwrite=overwrite, max_shard_size=max_shard_size,
                                   tensor_dtype=tensor_dtype, tensor_dtypes=loaded.source_dtypes, sources=sources))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_companions(folder: Path, tokenizer, generation_config, source) -> None:
    """Put the files copied into a checkpoint beside its weights into ``folder``."""
    from ..checkpoint.writer import copy_companion_files

    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    if Path(source).is_dir():
        copy_companion_files(source, folder)


def _rank_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _samples(job: QuantizeJob, tokenizer, model, source: str):
    needs_calib = (job.scheme != "w4a16" or job.weight_scale == "gptq" or job.kv_cache is not None
                   or (job.smooth != "none" and has_smoothing_groups(model)) or job.method == "auto")
    if not needs_calib:
        return None
    check_sequence_length(model, job.seq_len)
    if tokenizer is None:
        raise ValueError(f"--model {source!r} has no tokenizer files, needed to tokenize the calibration text")
    samples = calibration_samples(tokenizer, job.calib, job.calib_samples, job.seq_len, bos=job.bos)
    bos_id = sample_bos(tokenizer, job.bos)
    if bos_id is not None:
        progress.log(f"calibration samples start with BOS (token {bos_id}), as the tokenizer adds it "
                     "(--no-bos to leave it out)")
    if samples.shape[0] < job.calib_samples:
        progress.log(f"calibration text gave {samples.shape[0]} samples of {job.seq_len} tokens "
                     f"(asked for {job.calib_samples})")
    return samples


def check_job(job: QuantizeJob) -> None:
    """Refuse bad options before any work."""
    check_kv_cache_format(job.kv_cache)
    check_weight_scale(job.weight_scale)
    check_smoothing(job.smooth)
    if job.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {job.method!r}")
    if job.bits_budget is None:
        check_scheme(job.scheme, job.recipe)
    if job.load not in LOAD_MODES:
        raise ValueError(f"--load must be one of {', '.join(LOAD_MODES)}, got {job.load!r}")
    if job.activation_memory is not None and job.activation_memory < 0:
        raise ValueError(f"--activation-memory must be >= 0 GB, got {job.activation_memory}")


def _parameter_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def run_quantize(job: QuantizeJob, loaded: LoadedModel | None = None) -> tuple[QuantizeResult, Path]:
    """Load, calibrate, quantize and write; returns the result and the checkpoint folder. Launched by
    ``torchrun``, joins the process group (gloo on CPU, NCCL on CUDA) and quantizes block by block."""
    from ..training import distributed

    check_job(job)
    device = resolve_device(job.device)
    if loaded is None and distributed.launched_by_torchrun():
        info = distributed.init_distributed(device)
        if not info.is_main:
            progress.use_logging()
        try:
            return _run_quantize(job, device, None)
        finally:
            distributed.shutdown()
    return _run_quantize(job, device, loaded)


def job_sources(job: QuantizeJob, loaded: LoadedModel | None = None) -> list:
    """The paths a quantize job reads and its output must keep apart from: the model (the embedded one by
    default) and the calibration text."""
    model = loaded.source if loaded is not None else (embedded_model_path() if job.model is None else job.model)
    return [model, job.calib]


def _run_quantize(job: QuantizeJob, device: torch.device, loaded: LoadedModel | None):
    t_start = time.perf_counter()
    prepare_output_dir(job.out, job.overwrite, job_sources(job, loaded))
    _, world = _rank_world()
    if loaded is None:
        mode = job.load
        if mode == "auto":
            mode = "blocks" if world > 1 else _auto_mode(job, device)
        if mode == "blocks":
            return run_by_block(job, device, t_start)
        dtype = resolve_dtype(job.dtype, device, None)
        loaded = load_source_model(job.model, dtype, device)
    elif world > 1:
        raise ValueError("under torchrun, quantize loads the model itself (block by block)")
    check_whole_output_space(job, loaded)
    samples = _samples(job, loaded.tokenizer, loaded.model, loaded.source)
    plan = search = None
    if job.bits_budget is not None:
        if loaded.task != CAUSAL_LM:
            raise ValueError(f"--bits-budget measures each Linear's sensitivity on next-token predictions; "
                             f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}): "
                             "use --scheme w4a4/w4a16/fp8 with --exclude instead")
        plan, search = _searched_plan(job, loaded.model, samples)
    if samples is not None:
        samples = samples.to(device)
    transforms = job.transforms()
    if job.method == "auto":
        transforms = _auto_transforms(job, loaded, samples, plan)
    result = quantize_model(loaded.model, samples, job.scheme, job.weight_scale, job.exclude, job.recipe, plan=plan,
                            kv_cache=job.kv_cache, sequential=bool(job.sequential), transforms=transforms)
    t0 = time.perf_counter()
    path = save_checkpoint(result, loaded, job.out, job.format, job.overwrite, job.max_shard_size,
                           sources=job_sources(job, loaded))
    if search is not None:
        search.save(path / "mixed_precision.json")
    result.seconds["write"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    return result, path


# --method auto: the recipes tried (smoothing, rotation), the job's weight scale for each
AUTO_CANDIDATES = (Transforms(smooth="awq"), Transforms(smooth="none"), Transforms(smooth="smoothquant"),
                   Transforms(smooth="awq", rotate=True))
# the share of the calibration samples held out to score the candidates (at least one sample)
AUTO_HOLDOUT = 0.25


def _auto_transforms(job: QuantizeJob, loaded: LoadedModel, samples: torch.Tensor, plan) -> Transforms:
    """Try each of ``AUTO_CANDIDATES`` on the calibration samples less a held-out slice, score each
    quantized model (emulated) by its next-token loss on the held-out samples, and return the best."""
    from ..calibrate.emulation import apply_quantized
    from ..evaluate.perplexity import perplexity

    if loaded.task != CAUSAL_LM:
        raise ValueError(f"--method auto scores candidates by next-token loss; --model {loaded.source!r} is an "
                         f"encoder ({type(loaded.model).__name__}): choose --smooth / --rotate directly")
    n_held = max(1, int(round(samples.shape[0] * AUTO_HOLDOUT)))
    if samples.shape[0] - n_held < 1:
        raise ValueError(f"--method auto holds out {n_held} calibration sample(s) to score the candidates: "
                         f"give at least {n_held + 1} (--calib-samples)")
    fit, held = samples[:-n_held], samples[-n_held:]
    bos = sample_bos(loaded.tokenizer, job.bos)
    body = held[:, 1:] if bos is not None else held
    scores = []
    for cand in AUTO_CANDIDATES:
        if cand.rotate:
            try:
                from ..calibrate.rotation import check_rotatable

                check_rotatable(loaded.model)
            except ValueError as e:
                progress.log(f"--method auto: skipping {cand.describe()}: {e}")
                continue
        model = copy.deepcopy(loaded.model)
        with progress.task(f"--method auto: {cand.describe()}"):
            r = quantize_model(model, fit, job.scheme, job.weight_scale, job.exclude, job.recipe, plan=plan,
                               kv_cache=job.kv_cache, sequential=bool(job.sequential), transforms=cand)
            apply_quantized(model, r.qmodel)
            score = perplexity(model, body.reshape(-1), held.shape[1], bos_id=bos, desc="scoring").nll
        scores.append((score, cand))
        progress.log(f"--method auto: {cand.describe()}: held-out loss {score:.4f}")
        del model, r
    best = min(scores, key=lambda t: t[0])[1]
    progress.log(f"--method auto: keeping {best.describe()} (calibrating on all {samples.shape[0]} samples)")
    return best


def _auto_mode(job: QuantizeJob, device: torch.device) -> str:
    """``whole`` when the model's weights fit in ``WHOLE_MODEL_SHARE`` of the free memory (and always for
    what only the whole-model path does: a bits budget, a model without repeated blocks), else ``blocks``."""
    if job.bits_budget is not None:
        return "whole"
    try:
        bw = open_by_block(job.model, torch.float32, "cpu")
    except (ValueError, NotImplementedError):
        return "whole"
    if block_layout(bw.model) is None:
        return "whole"
    dtype = resolve_dtype(job.dtype, device, bw.source_dtype)
    need = _parameter_bytes(bw.model, dtype)
    free = available_memory(device)
    mode = "whole" if need <= WHOLE_MODEL_SHARE * free else "blocks"
    if mode == "blocks":
        progress.log(f"the model's weights take {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, more "
                     f"than {WHOLE_MODEL_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}: quantizing block "
                     "by block from disk (--load whole to load it anyway)")
    return mode


def _source_identity(path) -> list:
    p = embedded_model_path() if path is None else Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file() and x.suffix in (".safetensors",
                                                                                                  ".gguf", ".json"))
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]


def _signature(job: QuantizeJob, sequential: bool, dtype: torch.dtype, device: torch.device, world: int) -> dict:
    keep = ("model", "format", "scheme", "weight_scale", "calib", "calib_samples", "seq_len", "exclude", "recipe",
            "kv_cache", "max_shard_size", "bos", "smooth", "rotate")
    d = asdict(job)
    sig = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}
    sig.update(sequential=sequential, dtype=str(dtype), device=device.type, world=world,
               source=_source_identity(job.model))
    return sig


def estimated_output_bytes(model: nn.Module, plan, tensor_dtype: torch.dtype,
                           bits_per_weight: float | None = None) -> int:
    """About what the checkpoint of ``model`` under ``plan`` takes on disk (shapes only; works on a
    model on the meta device). ``bits_per_weight``: the average of a bits budget, for every Linear the
    plan quantizes (the search chooses their formats later)."""
    quantized = {n: plan.layers[n].format for n in plan.quantized()}
    elem = torch.empty((), dtype=tensor_dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        fmt = quantized.get(owner)
        if fmt is not None and leaf == "weight" and bits_per_weight is not None:
            total += int(p.numel() * bits_per_weight / 8)
        elif fmt == "nvfp4" and leaf == "weight":
            total += p.numel() // 2 + p.numel() // 16
        elif fmt == "fp8" and leaf == "weight":
            total += p.numel()
        else:
            total += p.numel() * elem
    return total


def _check_disk(out: Path, need: int) -> None:
    from ..checkpoint.space import check_free_space

    check_free_space(out, need, "quantizing block by block (the staged pieces, the checkpoint and spilled "
                                "activations)")


def check_whole_output_space(job: QuantizeJob, loaded: LoadedModel) -> None:
    """Before calibrating a model loaded whole: refuse an ``--out`` whose file system cannot hold the
    checkpoint (its size estimated from the model's shapes and the job's plan)."""
    from ..checkpoint.space import check_free_space

    budget = job.bits_budget
    plan = plan_model(loaded.model, "w4a16" if budget is not None else job.scheme, job.exclude,
                      None if budget is not None else job.recipe)
    dtype = loaded.source_dtype or next(loaded.model.parameters()).dtype
    check_free_space(job.out, estimated_output_bytes(loaded.model, plan, dtype, budget), "the checkpoint")


def run_by_block(job: QuantizeJob, device: torch.device, t_start: float | None = None) -> tuple[QuantizeResult, Path]:
    """The block-by-block way (see the module docs)."""
    from ..checkpoint.staged import StagedCheckpoint

    t_start = time.perf_counter() if t_start is None else t_start
    rank, world = _rank_world()
    if job.bits_budget is not None:
        raise ValueError("--bits-budget measures every Linear's sensitivity with the whole model: use --load whole")
    if job.rotate or job.method == "auto":
        what = "--rotate" if job.rotate else "--method auto"
        raise ValueError(f"{what} works on a model loaded whole for now: use --load whole (smoothing works "
                         "block by block)")
    sequential = True if job.sequential is None else job.sequential
    probe = open_by_block(job.model, torch.float32, "cpu")
    dtype = resolve_dtype(job.dtype, device, probe.source_dtype)
    bw = open_by_block(job.model, dtype, device) if dtype != torch.float32 or device.type != "cpu" else probe
    shapes_model = copy.deepcopy(bw.model)
    plan = plan_model(shapes_model, job.scheme, job.exclude, job.recipe)
    check_plan(shapes_model, plan)
    samples = _samples(job, bw.tokenizer, bw.model, bw.path)
    if samples is None:
        raise ValueError("block by block, quantizing means calibrating: weight-only max (w4a16 with --weight-scale "
                         "max) needs no model at all, use --weights-only-streaming")
    if job.kv_cache is not None and not attention_modules(bw.model):
        raise ValueError(f"--kv-cache {job.kv_cache}: found no attention module (a module with k_proj and v_proj "
                         "children) in the model")
    tensor_dtype = bw.source_dtype or dtype
    layout = block_layout(bw.model)
    if layout is None:
        raise ValueError(f"--load blocks: {type(bw.model).__name__} has no repeated blocks; use --load whole")
    hidden = getattr(bw.model.config, "hidden_size", None) or 0
    act = samples.numel() * hidden * 4
    budget = (int(job.activation_memory * 2**30) if job.activation_memory is not None
              else int(ACTIVATION_SHARE * available_memory(device)))
    sink = None
    if rank == 0:
        out_bytes = estimated_output_bytes(shapes_model, plan, tensor_dtype)
        _check_disk(Path(job.out), 2 * out_bytes + 2 * act)
        sink = StagedCheckpoint(job.out, job.format, _signature(job, sequential, dtype, device, world),
                                config=declare_dtype(config_dict(bw.model), tensor_dtype),
                                exclude_modules=sorted(plan.excluded()), kv_cache_format=job.kv_cache,
                                max_shard_size=job.max_shard_size, overwrite=job.overwrite, tensor_dtype=tensor_dtype,
                                source_dir=bw.path, tensor_dtypes=bw.source_dtypes,
                                sources=(bw.path, *job_sources(job)))
        stage_companions(sink.companions, bw.tokenizer, bw.generation_config, bw.path)
    del shapes_model
    resume = _resume_state(sink, budget, device) if sink is not None else None
    if world > 1:
        resume = _share_resume(resume, budget, device)
    if resume is not None:
        progress.log(f"resuming {job.out} after block {resume.next_block - 1} (the staged blocks are kept)")
    progress.log(f"quantizing {len(layout)} blocks of {type(bw.model).__name__} one at a time on {device} "
                 f"({str(dtype).removeprefix('torch.')}), {'sequential' if sequential else 'one-shot'} calibration, "
                 f"{samples.shape[0]} x {samples.shape[1]} tokens" + (f", {world} ranks" if world > 1 else ""))
    try:
        done = quantize_by_block(bw.model, samples.to(device), plan, job.weight_scale, sequential=sequential,
                                 kv_cache=job.kv_cache, source=bw.source, sink=sink, device=device,
                                 activation_memory=budget, spill_dir=(sink.dir / SPILL) if sink is not None else None,
                                 resume=resume, keep=False, smooth=job.smooth)
    except BaseException:
        if sink is not None:
            sink.discard_if_empty()  # finished blocks stay staged: the same command resumes after them
        raise
    t0 = time.perf_counter()
    path = Path(job.out).absolute()
    if sink is not None:
        path = sink.finish()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    seconds = dict(done.seconds, write=time.perf_counter() - t0, total=time.perf_counter() - t_start)
    qmodel = QuantizedModel(kv_cache_format=job.kv_cache, kv_cache_amax=done.kv_amax)
    return QuantizeResult(qmodel, plan, done.stats, seconds, done.n_tokens), path


def _resume_state(sink, budget: int, device) -> ResumeState | None:
    """What the staging folder of an interrupted run holds, as the engine's :class:`ResumeState`."""
    state = sink.state()
    inputs = state.get("inputs")
    if sink.units_done < 2 or not inputs:
        return None
    store = ActivationStore.load(sink.dir / inputs["file"], budget_bytes=budget, spill_dir=sink.dir / SPILL,
                                 device=device, name="inputs")
    kv = {k: tuple(v) for k, v in (state.get("kv_amax") or {}).items()}
    return ResumeState(sink.units_done - 1, store, kv, int(state.get("n_tokens") or 0))


def _share_resume(resume, budget, device):
    """Data-parallel ranks resume together: rank 0's staging decides (every rank recomputes its slice's
    activations only when starting fresh, so resuming under torchrun restarts the run)."""
    import torch.distributed as dist

    flag = torch.tensor([0 if resume is None else 1])
    dist.broadcast(flag, 0)
    if int(flag):
        raise ValueError("a staged run cannot be resumed under torchrun (the activations are split between the "
                         "ranks); run it again with --overwrite, or resume it in one process")
    return None


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


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = False, sources=()) -> Path:
    """Fail before any work if ``out`` cannot be written or is, contains or lies inside one of ``sources``
    (then nothing is touched); create its parent folders and remove what killed runs left beside it (the
    checkpoint itself is written to a temporary folder beside it and renamed when complete)."""
    from ..checkpoint.writer import check_output_dir, clean_stale_beside

    check_apart_from_sources(out, sources)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")
    from ..checkpoint.space import check_writable

    check_writable(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    checked = check_output_dir(out, overwrite, sources)
    clean_stale_beside(checked)
    return checked


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
    prepare_output_dir(job.out, job.overwrite, job_sources(job))
    return Path(quantize_checkpoint(job.model, job.out, "nvfp4" if job.scheme == "w4a16" else "fp8",
                                    job.exclude, format=job.format, overwrite=job.overwrite))
