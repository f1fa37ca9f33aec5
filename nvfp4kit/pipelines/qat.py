"""Quantization-aware post-training (QAT) and distillation (QAD): the job behind ``nvfp4kit qat``.

Steps: load the model (an HF folder, a ``.gguf`` file, a Nemotron 3 hybrid folder, or the embedded
SmolLM2-135M); keep a frozen
full-precision copy as the teacher when distilling; replace the Linears by fake-quant modules
(W4A4 or W4A16; a mixed-precision plan or a PTQ checkpoint may set the format per module);
calibrate the static activation amax (max observer, or taken from the PTQ checkpoint); train with
AdamW (linear warm-up, cosine decay to 10%) on windows of ``seq_len`` tokens drawn from the data;
export the quantized records with :func:`~nvfp4kit.checkpoint.save_quantized`, in the same formats
as ``nvfp4kit quantize``.

Training state lives beside the output, in ``OUT.qat/``: ``checkpoints/step_XXXXXXXX/``
(``trainable.safetensors``: the trained tensors and the fake-quant scales; ``optimizer.safetensors``;
``state.json``), ``checkpoints/latest``, and ``metrics.jsonl`` (one line per logged step). Each
checkpoint is written to a temporary directory and renamed when complete; ``resume=True`` continues
from the latest one. The window of every step is a pure function of (seed, step), so a resumed run
sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import progress
from ..calibrate.data import load_text, tokenize
from ..calibrate.mixed import MixedPrecisionPlan
from ..calibrate.qat import (
    DEFAULT_EXCLUDE,
    QATLoss,
    calibrate_input_amax,
    export_quantized_model,
    fake_quant_modules,
    frozen_teacher,
    model_logits,
    next_token_loss,
    prepare_qat,
)
from ..checkpoint.types import QuantizedModel

SCHEMES = ("w4a4", "w4a16")
TRAINABLE = ("quantized", "all")


# ----------------------------------------------------------------------------- loading


def load_model_and_tokenizer(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer: an HF folder, a ``.gguf`` file, a Nemotron 3 hybrid folder, or the
    embedded default (loaded as ``nvfp4kit quantize`` loads it)."""
    from .hf_models import CAUSAL_LM
    from .quantize import load_source_model

    p = None if path is None else Path(path)
    if p is not None and p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if "quantization_config" in cfg or (p / "hf_quant_config.json").is_file():
            raise ValueError(f"--model {str(p)!r} is a quantized checkpoint; train from its full-precision source "
                             "and pass the PTQ checkpoint as --ptq")
    loaded = load_source_model(path, dtype)
    if loaded.task != CAUSAL_LM:
        raise ValueError(f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}); QAT/QAD here train "
                         "on next-token prediction and need a causal LM")
    if loaded.tokenizer is None:
        raise ValueError(f"--model {loaded.source!r} has no tokenizer files, needed to tokenize --data")
    return loaded.model, loaded.tokenizer


# ----------------------------------------------------------------------------- data


def window(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The ``[batch_size, seq_len]`` training batch of ``step``: random windows, a function of (seed, step)."""
    n = tokens.numel() - seq_len
    if n < 1:
        raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n, (batch_size,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def split_tokens(tokens: torch.Tensor, eval_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out evaluation windows ``[n, seq_len]`` from the end of the text)."""
    n_eval = eval_tokens // seq_len
    if n_eval <= 0:
        return tokens, tokens.new_zeros((0, seq_len))
    held = n_eval * seq_len
    if tokens.numel() - held < 2 * seq_len:
        raise ValueError(f"the data has {tokens.numel()} tokens: too few to hold out {held} for evaluation "
                         f"and still train on windows of {seq_len}")
    return tokens[:-held], tokens[-held:].reshape(n_eval, seq_len).clone()


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` ``[n, L]`` (each predicts L-1 tokens)."""
    if windows.numel() == 0:
        raise ValueError("mean_loss: no evaluation windows")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size]
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(next_token_loss(model_logits(model, ids), ids)) * n
            count += n
    finally:
        model.train(was)
    return total / count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    return math.exp(mean_loss(model, windows, batch_size))


# ----------------------------------------------------------------------------- the job


@dataclass
class QATJob:
    model: str | None = None
    data: str | None = None  # text source (see nvfp4kit.calibrate.data.load_text); None: built-in
    out: str = "nvfp4kit-qat"
    steps: int = 100
    distill: bool = False
    scheme: str = "w4a4"
    format: str = "modelopt"
    lr: float = 1e-5
    warmup: int = 5
    weight_decay: float = 0.0
    batch_size: int = 1
    seq_len: int = 256
    seed: int = 0
    temperature: float = 1.0
    ce_weight: float = 0.0
    trainable: str = "quantized"
    weight_amax: str = "dynamic"
    weight_scale: str = "max"
    calib_samples: int = 16
    eval_tokens: int = 4096
    ptq: str | None = None
    weights_from_ptq: bool = False
    plan: str | None = None
    exclude: tuple[str, ...] = ()
    save_every: int = 50
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"--scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.lr <= 0 or self.batch_size <= 0 or self.seq_len < 2:
            raise ValueError("--lr and --batch-size must be positive and --seq-len at least 2")
        if self.ptq and self.plan:
            raise ValueError("give either --ptq (formats and scales from a PTQ checkpoint) or --plan, not both")


@dataclass
class QATResult:
    out: Path | None
    steps: int
    tokens_trained: int
    loss_first: float | None
    loss_last: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ppl_before(self) -> float | None:
        return None if self.eval_loss_before is None else math.exp(self.eval_loss_before)

    @property
    def ppl_after(self) -> float | None:
        return None if self.eval_loss_after is None else math.exp(self.eval_loss_after)


def lr_at(step: int, job: QATJob) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at the last step."""
    if job.warmup and step < job.warmup:
        return job.lr * (step + 1) / job.warmup
    span = max(1, job.steps - job.warmup)
    frac = min(1.0, (step - job.warmup) / span)
    return job.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def trainable_parameters(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters QAT updates: the fake-quant Linears' weights and biases, or all of them."""
    if which == "all":
        return {n: p for n, p in model.named_parameters()}
    fq = fake_quant_modules(model)
    out = {}
    for name, m in fq.items():
        out[f"{name}.weight"] = m.weight
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    return out


def prepare_model(model: nn.Module, job: QATJob, calib: torch.Tensor | None,
                  ptq: QuantizedModel | None = None) -> dict:
    """Fake-quantize ``model`` per the job and set its static activation scales."""
    exclude = tuple(DEFAULT_EXCLUDE) + tuple(job.exclude)
    quantize_input = job.scheme == "w4a4"
    if ptq is not None:
        mods = prepare_qat(model, ptq=ptq, quantize_input=quantize_input, exclude=exclude,
                           weights_from_ptq=job.weights_from_ptq, weight_amax=job.weight_amax,
                           weight_scale=job.weight_scale)
        missing = [n for n, m in mods.items() if m.quantize_input and m.format != "bf16" and not m.has_input_amax()]
        if missing and calib is not None:
            calibrate_input_amax(model, [c.unsqueeze(0) for c in calib], reset=False)
        elif missing:
            raise ValueError(f"the PTQ checkpoint has no input scales for {missing[:3]}; use --scheme w4a16")
    else:
        formats = "nvfp4"
        if job.plan:
            formats = MixedPrecisionPlan.load(job.plan).formats
        mods = prepare_qat(model, formats, quantize_input, exclude, weight_amax=job.weight_amax,
                           weight_scale=job.weight_scale)
        if quantize_input:
            if calib is None:
                raise ValueError("W4A4 needs calibration samples for the static activation scales")
            calibrate_input_amax(model, [c.unsqueeze(0) for c in calib])
    if not mods:
        raise ValueError("no Linear to quantize (check --exclude / --plan)")
    return mods


def _state_dir(out: str) -> Path:
    return Path(str(Path(out)) + ".qat")


def _save_training_checkpoint(state_dir: Path, step: int, model: nn.Module, params: dict[str, nn.Parameter],
                              opt: torch.optim.Optimizer, meta: dict) -> Path:
    root = state_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: p.detach().cpu().clone().contiguous() for k, p in params.items()}
    for mname, m in fake_quant_modules(model).items():
        tensors[f"{mname}.input_amax"] = m.input_amax.detach().cpu().clone()
        tensors[f"{mname}.fixed_weight_amax"] = m.fixed_weight_amax.detach().cpu().clone()
    save_file(tensors, str(tmp / "trainable.safetensors"))
    by_param = {id(p): k for k, p in params.items()}
    opt_tensors = {}
    for p, st in opt.state.items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            opt_tensors[f"{by_param[id(p)]}/{key}"] = t.detach().cpu().clone().contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(dict(meta, step=step), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".latest.tmp{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_checkpoint(state_dir: Path) -> Path | None:
    root = state_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    return None


def _load_training_checkpoint(path: Path, model: nn.Module, params: dict[str, nn.Parameter],
                              opt: torch.optim.Optimizer) -> dict:
    for f in ("trainable.safetensors", "optimizer.safetensors", "state.json"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"QAT checkpoint {path}: missing {f}")
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "trainable.safetensors"))
    fq = fake_quant_modules(model)
    expected = set(params) | {f"{n}.{b}" for n in fq for b in ("input_amax", "fixed_weight_amax")}
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)[:3]
        raise ValueError(f"QAT checkpoint {path} does not match this model and job (differs at {diff})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
        for n, m in fq.items():
            m.input_amax.copy_(tensors[f"{n}.input_amax"])
            m.fixed_weight_amax.copy_(tensors[f"{n}.fixed_weight_amax"])
    flat = load_file(str(path / "optimizer.safetensors"))
    for key, t in flat.items():
        pname, k = key.rsplit("/", 1)
        if pname not in params:
            raise ValueError(f"QAT checkpoint {path}: optimizer state for unknown parameter {pname!r}")
        opt.state[params[pname]][k] = t
    return meta


def _job_signature(job: QATJob) -> dict:
    keep = ("model", "data", "distill", "scheme", "lr", "warmup", "weight_decay", "batch_size", "seq_len", "seed",
            "temperature", "ce_weight", "trainable", "weight_amax", "weight_scale", "ptq", "plan", "exclude", "steps")
    d = asdict(job)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}


def train_qat(model: nn.Module, tokens: torch.Tensor, job: QATJob, teacher: nn.Module | None = None,
              state_dir: Path | None = None, eval_windows: torch.Tensor | None = None) -> QATResult:
    """Train a fake-quantized model in place for ``job.steps`` steps (resuming from ``state_dir``)."""
    params = trainable_parameters(model, job.trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=job.lr, weight_decay=job.weight_decay)
    loss_fn = QATLoss(job.distill, job.temperature, job.ce_weight)
    if job.distill and teacher is None:
        raise ValueError("distillation needs the teacher model")
    start, metrics_path = 0, None
    first = last = None
    if state_dir is not None:
        metrics_path = state_dir / "metrics.jsonl"
        ckpt = _latest_checkpoint(state_dir) if job.resume else None
        if ckpt is not None:
            meta = _load_training_checkpoint(ckpt, model, params, opt)
            if meta.get("job") != _job_signature(job):
                raise ValueError(f"--resume: the checkpoint {ckpt} was written by a different job configuration")
            start, first, last = int(meta["step"]), meta.get("loss_first"), meta.get("loss_last")
            progress.log(f"resumed from {ckpt} (step {start})")
        elif state_dir.exists() and any(state_dir.iterdir()):
            if not job.overwrite:
                raise FileExistsError(f"{state_dir} holds an earlier QAT run: pass --resume to continue it "
                                      "or --overwrite to start again")
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
    eval_before = mean_loss(model, eval_windows) if eval_windows is not None and eval_windows.numel() and start == 0 \
        else None
    t0 = time.perf_counter()
    model.train()
    with progress.task("qad" if job.distill else "qat", total=job.steps) as task:
        task.advance(start)
        for step in range(start, job.steps):
            ids = window(tokens, job.seq_len, job.batch_size, job.seed, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, job)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = model_logits(teacher, ids)
            loss = loss_fn(model_logits(model, ids), ids, t_logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"QAT step {step}: the loss is {float(loss)}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
            first = last if first is None else first
            task.advance(1, loss=last, lr=opt.param_groups[0]["lr"])
            if metrics_path is not None and (step % job.log_every == 0 or step + 1 == job.steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": last, "lr": opt.param_groups[0]["lr"],
                                        "tokens": (step + 1) * job.batch_size * job.seq_len}) + "\n")
            done = step + 1
            if state_dir is not None and job.save_every and (done % job.save_every == 0 or done == job.steps):
                _save_training_checkpoint(state_dir, done, model, params, opt,
                                          {"job": _job_signature(job), "loss_first": first, "loss_last": last})
    model.eval()
    for p in params.values():
        p.grad = None
    eval_after = mean_loss(model, eval_windows) if eval_windows is not None and eval_windows.numel() else None
    return QATResult(None, job.steps, job.steps * job.batch_size * job.seq_len, first, last, eval_before, eval_after,
                     {"train": time.perf_counter() - t0})


def run_qat(job: QATJob) -> QATResult:
    """The whole ``nvfp4kit qat`` job: load, fake-quantize, calibrate, train, export."""
    job.check()
    t_start = time.perf_counter()
    from .quantize import prepare_output_dir

    out = Path(job.out)
    prepare_output_dir(out, job.overwrite)
    with progress.task("loading model", total=1) as t:
        model, tok = load_model_and_tokenizer(job.model)
        t.advance(1)
    tokens = tokenize(tok, load_text(job.data, "calib"))
    train_tokens, eval_windows = split_tokens(tokens, job.eval_tokens, job.seq_len)
    n_cal = min(job.calib_samples, train_tokens.numel() // job.seq_len)
    calib = train_tokens[: n_cal * job.seq_len].reshape(n_cal, job.seq_len) if n_cal else None
    teacher = frozen_teacher(model) if job.distill else None
    ptq = None
    if job.ptq:
        from ..checkpoint import load_quantized

        ptq = load_quantized(job.ptq)
    mods = prepare_model(model, job, calib, ptq)
    counts: dict[str, int] = {}
    for m in mods.values():
        counts[m.format] = counts.get(m.format, 0) + 1
    progress.log(f"fake-quantized {len(mods)} Linears ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
                 f"scheme {job.scheme}, weight amax {job.weight_amax}, activation amax static (calibrated)")
    state_dir = _state_dir(job.out)
    result = train_qat(model, train_tokens, job, teacher, state_dir, eval_windows)
    qmodel = export_quantized_model(model)
    staging = Path(tempfile.mkdtemp(prefix="nvfp4kit-src-"))
    t0 = time.perf_counter()
    try:
        tok.save_pretrained(str(staging))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(staging))
        qmodel.source_dir = str(staging)
        from ..checkpoint import save_quantized

        result.out = Path(save_quantized(qmodel, out, format=job.format, overwrite=job.overwrite))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds["write"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    summary = {"steps": result.steps, "tokens_trained": result.tokens_trained, "loss_first": result.loss_first,
               "loss_last": result.loss_last, "eval_loss_before": result.eval_loss_before,
               "eval_loss_after": result.eval_loss_after, "seconds": result.seconds, "job": _job_signature(job)}
    (state_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


__all__ = ["QATJob", "QATResult", "load_model_and_tokenizer", "lr_at", "mean_loss", "perplexity", "prepare_model",
           "run_qat", "split_tokens", "train_qat", "trainable_parameters", "window"]
