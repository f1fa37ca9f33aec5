"""Quantization-aware post-training (QAT) and distillation (QAD): the job behind ``nvfp4kit qat``.

Steps: load the model (an HF folder, a ``.gguf`` file, a Nemotron 3 hybrid folder, or the embedded
SmolLM2-135M; :mod:`nvfp4kit.pipelines.models`); keep a frozen full-precision copy as the teacher when
distilling; replace the Linears by fake-quant modules (W4A4 or W4A16; a mixed-precision plan or a PTQ
checkpoint may set the format per module; :mod:`nvfp4kit.calibrate.qat`); calibrate the static
activation amax (max observer, or taken from the PTQ checkpoint); train on :mod:`nvfp4kit.training`'s
loop (AdamW, linear warm-up then cosine decay to 10% of the peak at the last step, exact-resume
checkpoints, metrics) on non-overlapping windows of ``seq_len`` tokens in a seeded order; export the
quantized records with :func:`~nvfp4kit.checkpoint.save_quantized`, in the same formats as
``nvfp4kit quantize``.

Training state lives beside the output, in ``OUT.qat/``: the training loop's ``checkpoints/step_XXXXXXXX/``
and ``checkpoints/latest``, ``metrics.csv`` / ``metrics.json`` / ``loss.png``. ``resume=True`` continues
from the latest checkpoint of the same job (a different configuration is refused).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import progress, scratch
from ..calibrate.data import load_text, sample_bos, token_samples, tokenize
from ..calibrate.mixed import MixedPrecisionPlan
from ..calibrate.qat import (
    QATLoss,
    calibrate_input_amax,
    export_quantized_model,
    fake_quant_modules,
    frozen_teacher,
    prepare_qat,
)
from ..checkpoint.quantized import MODELOPT
from ..checkpoint.types import QuantizedModel
from ..checkpoint.writer import check_apart_from_sources
from ..evaluate.perplexity import ppl_from_nll
from ..losses import causal_lm_logits
from ..policy import DEFAULT_EXCLUDE
from ..training import checkpointing
from ..training.data import PackedLoader
from ..training.loop import TrainConfig, evaluate, make_optimizer, train
from ..devices import resolve_device
from .models import embedded_model_path, load_causal_lm

SCHEMES = ("w4a4", "w4a16")
TRAINABLE = ("quantized", "all")
# QAT fine-tunes a pretrained model: AdamW's usual betas, no gradient clipping, no autocast (the fake
# quantizers compute in the model's precision)
QAT_BETA2 = 0.999
MIN_LR_RATIO = 0.1


# ----------------------------------------------------------------------------- data


def split_tokens(tokens: torch.Tensor, eval_tokens: int, seq_len: int,
                 bos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out evaluation windows ``[n, seq_len]`` from the end of the text); with
    ``bos_id`` each window is BOS and ``seq_len - 1`` tokens of the text."""
    n_eval = eval_tokens // seq_len
    if n_eval <= 0:
        return tokens, tokens.new_zeros((0, seq_len))
    width = seq_len - (bos_id is not None)
    held = n_eval * width
    if tokens.numel() - held < 2 * width:
        raise ValueError(f"the data has {tokens.numel()} tokens: too few to hold out {held} for evaluation "
                         f"and still train on windows of {seq_len}")
    return tokens[:-held], token_samples(tokens[-held:], n_eval, seq_len, bos_id)


def training_windows(tokens: torch.Tensor, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from the start of ``tokens`` (the tail shorter than one is
    dropped); with ``bos_id`` each window is BOS and ``seq_len - 1`` tokens of the text."""
    width = seq_len - (bos_id is not None)
    if tokens.numel() < width:
        raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return token_samples(tokens, tokens.numel() // width, seq_len, bos_id)


# ----------------------------------------------------------------------------- the job


@dataclass
class QATJob:
    model: str | None = None
    data: str | None = None  # text source (see nvfp4kit.calibrate.data.load_text); None: built-in
    out: str = "nvfp4kit-qat"
    steps: int = 100
    distill: bool = False
    scheme: str = "w4a4"
    format: str = MODELOPT
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
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    bos: bool = True  # every window starts with the tokenizer's BOS when it adds one

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
        return None if self.eval_loss_before is None else ppl_from_nll(self.eval_loss_before)

    @property
    def ppl_after(self) -> float | None:
        return None if self.eval_loss_after is None else ppl_from_nll(self.eval_loss_after)


def train_config(job: QATJob, n_eval: int) -> TrainConfig:
    """The training loop's configuration for a QAT job (the loop owns the schedule: warm-up, then cosine
    decay to ``MIN_LR_RATIO`` of the peak at the last step)."""
    return TrainConfig(steps=job.steps, batch_size=job.batch_size, seq_len=job.seq_len, lr=job.lr,
                       min_lr_ratio=MIN_LR_RATIO, warmup=job.warmup, schedule="cosine",
                       weight_decay=job.weight_decay, beta2=QAT_BETA2, grad_clip=0.0, eval_every=0,
                       eval_sequences=max(n_eval, 1), ckpt_every=job.save_every, seed=job.seed, autocast="off")


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
            calibrate_input_amax(model, [c.unsqueeze(0).to(_device(model)) for c in calib], reset=False)
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
            calibrate_input_amax(model, [c.unsqueeze(0).to(_device(model)) for c in calib])
    if not mods:
        raise ValueError("no Linear to quantize (check --exclude / --plan)")
    return mods


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def job_sources(job: QATJob) -> list:
    """The paths a QAT job reads, which its output and training state must keep apart from: the model (the
    embedded one by default), the training text, the PTQ checkpoint and the plan."""
    return [embedded_model_path() if job.model is None else job.model, job.data, job.ptq, job.plan]


def state_dir(out: str) -> Path:
    """Where a QAT job keeps its training state: ``OUT.qat/`` beside the output."""
    return Path(str(Path(out)) + ".qat")


def job_signature(job: QATJob) -> dict:
    """The options that must be equal for a run to be resumed."""
    keep = ("model", "data", "distill", "scheme", "lr", "warmup", "weight_decay", "batch_size", "seq_len", "seed",
            "temperature", "ce_weight", "trainable", "weight_amax", "weight_scale", "ptq", "plan", "exclude", "steps", "bos")
    d = asdict(job)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}


def qat_objective(job: QATJob, teacher: nn.Module | None):
    """The training loop's ``loss_fn`` for the job: next-token loss (QAT) or KL to the teacher (QAD)."""
    loss = QATLoss(job.distill, job.temperature, job.ce_weight)
    if job.distill and teacher is None:
        raise ValueError("distillation needs the teacher model")

    def loss_fn(model, batch):
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = causal_lm_logits(teacher, batch)
        return loss(causal_lm_logits(model, batch), batch, t_logits), None

    return loss_fn


def held_out_loss(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig) -> float | None:
    """Mean next-token loss (nats) of ``model`` over the held-out windows (None without windows)."""
    if windows.numel() == 0:
        return None
    return evaluate(model, windows, cfg, next(model.parameters()).device)


def train_qat(model: nn.Module, windows: torch.Tensor, job: QATJob, teacher: nn.Module | None = None,
              run_dir: Path | None = None, eval_windows: torch.Tensor | None = None) -> QATResult:
    """Train a fake-quantized model in place for ``job.steps`` steps on ``windows`` ``[n, seq_len]``
    with the training loop, keeping its state in ``run_dir`` (resuming from it with ``job.resume``)."""
    eval_windows = windows.new_zeros((0, job.seq_len)) if eval_windows is None else eval_windows
    cfg = train_config(job, eval_windows.shape[0])
    params = trainable_parameters(model, job.trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    own_dir = run_dir is None  # no place for the state: a temporary one, removed afterwards
    run_dir = scratch.system_temp_dir("qat") if own_dir else Path(run_dir)
    try:
        resuming = job.resume and checkpointing.latest_checkpoint(run_dir) is not None
        try:
            checkpointing.prepare_run_dir(run_dir, resume=resuming, overwrite=job.overwrite and not resuming)
        except FileExistsError:
            raise FileExistsError(f"{run_dir} holds an earlier QAT run: pass --resume to continue it "
                                  "or --overwrite to start again") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        eval_before = None if resuming else held_out_loss(model, eval_windows, cfg)
        t0 = time.perf_counter()
        rows: list[dict] = []
        if job.steps:
            optimizer = make_optimizer(model, cfg)
            loader = PackedLoader(windows, job.batch_size, seed=job.seed)
            train(model, optimizer, loader, eval_windows if eval_windows.numel() else None, cfg, run_dir,
                  resume=job.resume, loss_fn=qat_objective(job, teacher), device=next(model.parameters()).device,
                  run_info={"title": f"{'QAD' if job.distill else 'QAT'} {job.scheme}",
                            "signature": job_signature(job)})
            rows = _metric_rows(run_dir)
    finally:
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    model.eval()
    for p in params.values():
        p.grad = None
    eval_after = held_out_loss(model, eval_windows, cfg)
    return QATResult(None, job.steps, job.steps * job.batch_size * job.seq_len,
                     rows[0]["loss"] if rows else None, rows[-1]["loss"] if rows else None, eval_before, eval_after,
                     {"train": time.perf_counter() - t0})


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def check_output_space(job: QATJob, model: nn.Module) -> None:
    """Before training: refuse an output location without room for the quantized checkpoint and the
    training state beside it (the loop keeps ``keep_checkpoints`` checkpoints and writes one more)."""
    from ..calibrate.surgery import linear_shapes
    from ..checkpoint.space import check_free_space
    from ..policy import plan_precision
    from .quantize import estimated_output_bytes

    plan = plan_precision(linear_shapes(model), job.scheme, (), default_exclude=tuple(DEFAULT_EXCLUDE) + tuple(job.exclude))
    dtype = next(model.parameters()).dtype
    need = estimated_output_bytes(model, plan, dtype)
    if job.steps > 0:
        quantized = set(plan.quantized())
        params = dict(model.named_parameters())
        trained = (params.values() if job.trainable == "all"
                   else [p for n, p in params.items() if n.rpartition(".")[0] in quantized])
        # model state + AdamW's two moments of every trained parameter
        state = sum(p.numel() * p.element_size() for p in params.values())
        state += 2 * sum(p.numel() * p.element_size() for p in trained)
        need += (TrainConfig.keep_checkpoints + 1) * state
    check_free_space(job.out, need, "the checkpoint and the training state beside it" if job.steps > 0
                     else "the checkpoint")


def run_qat(job: QATJob) -> QATResult:
    """The whole ``nvfp4kit qat`` job: load, fake-quantize, calibrate, train, export."""
    job.check()
    t_start = time.perf_counter()
    from .quantize import prepare_output_dir

    out = Path(job.out)
    sources = job_sources(job)
    check_apart_from_sources(state_dir(job.out), sources, "training state folder")
    prepare_output_dir(out, job.overwrite, sources)
    device = resolve_device(job.device)
    with progress.task("loading model", total=1) as t:
        model, tok = load_causal_lm(job.model, device=device)
        t.advance(1)
    check_output_space(job, model)
    tokens = tokenize(tok, load_text(job.data, "calib"))
    bos_id = sample_bos(tok, job.bos)
    if bos_id is not None:
        progress.log(f"every training, calibration and evaluation window starts with BOS (token {bos_id}), as the "
                     "tokenizer adds it (--no-bos to leave it out)")
    train_tokens, eval_windows = split_tokens(tokens, job.eval_tokens, job.seq_len, bos_id)
    windows = training_windows(train_tokens, job.seq_len, bos_id)
    n_cal = min(job.calib_samples, windows.shape[0])
    calib = windows[:n_cal] if n_cal else None
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
    result = train_qat(model, windows, job, teacher, state_dir(job.out), eval_windows)
    qmodel = export_quantized_model(model)
    staging = scratch.system_temp_dir("src")
    t0 = time.perf_counter()
    try:
        tok.save_pretrained(str(staging))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(staging))
        qmodel.source_dir = str(staging)
        from ..checkpoint import save_quantized

        result.out = Path(save_quantized(qmodel, out, format=job.format, overwrite=job.overwrite, sources=sources))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds["write"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    return result


__all__ = ["QATJob", "QATResult", "held_out_loss", "job_signature", "prepare_model", "qat_objective", "run_qat",
           "split_tokens", "state_dir", "train_config", "train_qat", "trainable_parameters", "training_windows"]
