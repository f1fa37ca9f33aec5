"""The training loop: AdamW, warmup + cosine / WSD schedule, gradient clipping, optional bf16
autocast, periodic validation, metrics (CSV, JSON, loss-curve PNG) and exact-resume checkpoints.

Exact resume: the learning rate is a pure function of the step, the data loader's position, the
optimizer state and every rank's RNG state (stochastic rounding draws from it) are checkpointed
after a step, so a run stopped after step k and resumed computes the same losses as one that never
stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import progress, scratch
from ..optional import MissingDependency, require
from ..kernels.dispatch import raise_if_nonfinite
from . import checkpointing
from .data import PackedLoader


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, all ranks together
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, stable, decay)
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    autocast: str = "auto"  # "auto", "bf16" or "off"

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"--batch-size must be >= 1 and --seq-len >= 2, got {self.batch_size}, {self.seq_len}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"--autocast must be auto, bf16 or off, got {self.autocast!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--lr must be > 0 and --min-lr-ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ValueError(f"--wsd-decay-fraction must be in (0, 1], got {self.wsd_decay_fraction}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine decay
    to ``lr * min_lr_ratio`` at the last step, or (WSD) constant until the last
    ``wsd_decay_fraction`` of the steps and a linear decay to the minimum over those."""
    lr_min = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    last = max(cfg.steps - 1, 1)
    if cfg.schedule == "cosine":
        span = max(last - cfg.warmup, 1)
        frac = min(max(step - cfg.warmup, 0) / span, 1.0)
        return lr_min + 0.5 * (cfg.lr - lr_min) * (1 + math.cos(math.pi * frac))
    decay_steps = max(1, int(round(cfg.wsd_decay_fraction * cfg.steps)))
    start = cfg.steps - decay_steps
    if step < start:
        return cfg.lr
    frac = min((step - start + 1) / decay_steps, 1.0)
    return cfg.lr + (lr_min - cfg.lr) * frac


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_context(mode: str, device: torch.device):
    """bf16 autocast for ``mode="bf16"``; ``"auto"``: on CUDA, and on CPUs with native bf16."""
    on = mode == "bf16" or (mode == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())))
    if not on:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on float32 master weights; no weight decay on vectors (norms, biases, Mamba A/D/dt)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is None:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def _loss_of(out):
    if isinstance(out, torch.Tensor):
        return out, None
    main = getattr(out, "main_loss", None)
    return out.loss, main


def model_loss(model: torch.nn.Module, batch: torch.Tensor):
    """The default training objective: the model's own loss for ``labels=batch`` (for the Nemotron 3
    model the main next-token loss plus its MTP losses). Returns ``(loss, main loss or None)``."""
    return _loss_of(model(batch, labels=batch))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: TrainConfig, device, rank: int = 0, world: int = 1) -> float | None:
    """Mean main-token loss over the first ``eval_sequences`` held-out sequences (all ranks together)."""
    if val is None or val.shape[0] == 0:
        return None
    n = min(cfg.eval_sequences, val.shape[0])
    n -= n % world
    if n == 0:
        return None
    per = n // world
    mine = val[rank * per:(rank + 1) * per]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    bs = max(1, cfg.batch_size // world)
    for i in range(0, mine.shape[0], bs):
        batch = mine[i:i + bs].to(device)
        with autocast_context(cfg.autocast, device):
            out = model(batch, labels=batch, mtp_depths=0) if _accepts_mtp(model) else model(batch, labels=batch)
        loss, main = _loss_of(out)
        total += (main if main is not None else loss).double().cpu() * batch.shape[0]
    raise_if_nonfinite()
    model.train(was_training)
    return float(_mean_across_ranks(total / mine.shape[0]))


def _accepts_mtp(model) -> bool:
    import inspect

    fwd = getattr(model, "module", model).forward
    try:
        return "mtp_depths" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(scratch.owned(f".{path.name}.tmp-"))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


METRIC_FIELDS = ("step", "loss", "main_loss", "val_loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s")


_NOTED_NO_CHART: set[str] = set()


def write_metrics(out_dir: Path, rows: list[dict], summary: dict) -> None:
    """``metrics.csv`` (one row a step), ``metrics.json`` (summary + rows) and ``loss.png`` (when matplotlib,
    from the ``hf`` extra, is installed: without it the run goes on, saying once that the chart is skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    _atomic_write_bytes(out_dir / "metrics.csv", buf.getvalue().encode())
    _atomic_write_bytes(out_dir / "metrics.json", json.dumps({"summary": summary, "rows": rows}, indent=1).encode())
    try:
        plot_loss(rows, out_dir / "loss.png", title=summary.get("title", "training loss"))
    except MissingDependency as e:
        if str(out_dir) not in _NOTED_NO_CHART:
            _NOTED_NO_CHART.add(str(out_dir))
            progress.log(f"loss.png is not drawn: {e}")


def plot_loss(rows: list[dict], path: Path, title: str = "training loss") -> None:
    require("matplotlib", "drawing loss.png").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _atomic_write_bytes(Path(path), buf.getvalue())


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: PackedLoader, val: torch.Tensor | None,
          cfg: TrainConfig, out_dir, *, resume: bool = True, run_info: dict | None = None,
          stop_after: int | None = None, device=None, loss_fn=model_loss, overwrite: bool = False) -> dict:
    """Train for ``cfg.steps`` steps (continuing from the newest complete checkpoint in ``out_dir`` when
    ``resume``; a new run where an earlier one left its files is refused unless ``overwrite``, which
    removes them first and starts again: see :func:`~nvfp4kit.training.checkpointing.prepare_run_dir`).
    ``stop_after``: end after that many steps (and checkpoint), as an interrupted run.
    ``loss_fn(model, batch) -> (loss, main loss or None)``: the objective (default :func:`model_loss`;
    QAT/QAD pass theirs). ``run_info["signature"]``, when given, must equal the resumed checkpoint's:
    a run is never continued under a different configuration.

    Returns the summary written to ``metrics.json``."""
    cfg.validate()
    out_dir = Path(out_dir)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    world = dist.get_world_size() if dist else 1
    device = torch.device(device or next(model.parameters()).device)
    rows: list[dict] = []
    start = 0
    resume = resume and not overwrite
    checkpointing.prepare_run_dir(out_dir, resume=resume, overwrite=overwrite, remove=rank == 0)
    if dist is not None:
        dist.barrier()  # rank 0 has removed what it had to before any rank looks for a checkpoint
    if resume:
        ckpt = checkpointing.latest_checkpoint(out_dir, warn=rank == 0)
        if ckpt is not None:
            wanted = (run_info or {}).get("signature")
            if wanted is not None and checkpointing.read_state(ckpt).get("run", {}).get("signature") != wanted:
                raise ValueError(f"resume: the checkpoint {ckpt} was written by a different run configuration; "
                                 "start a new run elsewhere (or remove the old one)")
            state, rng = checkpointing.load_checkpoint(ckpt, model, optimizer)
            loader.load_state(state["data"])
            if not checkpointing.restore_rng_states(rng):
                progress.log(f"resume: {ckpt} has no RNG state for rank {rank}; stochastic rounding will differ")
                torch.manual_seed(cfg.seed + rank)
            rows = [r for r in state.get("metrics", []) if r["step"] <= state["step"]]
            start = int(state["step"])
            progress.log(f"resumed from {ckpt} at step {start}")
    if start == 0:
        torch.manual_seed(cfg.seed * 1000 + rank)
    tokens_per_step = cfg.batch_size * loader.data.shape[1]
    summary = {
        "title": (run_info or {}).get("title", "training loss"),
        "config": asdict(cfg),
        "run": run_info or {},
        "world_size": world,
    }

    def checkpoint(step: int):
        state = {"data": loader.state(), "metrics": rows, "config": asdict(cfg), "run": run_info or {},
                 "world_size": world}
        path = checkpointing.save_checkpoint(out_dir, step, model, optimizer, state, keep=cfg.keep_checkpoints)
        if rank == 0:
            write_metrics(out_dir, rows, dict(summary, last_step=step))
        return path

    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    with progress.task("training", total=cfg.steps) as task:
        task.advance(start)
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = loader.next().to(device)
            with autocast_context(cfg.autocast, device):
                loss, main = loss_fn(model, batch)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            loss_v = float(_mean_across_ranks(loss.detach().float()))
            raise_if_nonfinite()  # NaN/inf operands of the fused NVFP4 path, counted on the device this step
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"step {step + 1}: loss is {loss_v}; lower --lr or check the recipe")
            row = {
                "step": step + 1, "loss": loss_v,
                "main_loss": float(_mean_across_ranks(main.detach().float())) if main is not None else None,
                "val_loss": None, "lr": lr, "grad_norm": float(gn), "tokens": (step + 1) * tokens_per_step,
                "step_time_s": dt, "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
            }
            evaluated = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
            if evaluated:
                row["val_loss"] = evaluate(model, val, cfg, device, rank, world)
            rows.append(row)
            if evaluated and rank == 0:  # metrics so far, readable while the run goes on
                write_metrics(out_dir, rows, dict(summary, last_step=step + 1))
            fields = {"loss": loss_v, "tok/s": round(row["tokens_per_s"] or 0.0)}
            if row["val_loss"] is not None:
                fields["val"] = row["val_loss"]
            task.advance(1, **fields)
            if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == end:
                checkpoint(step + 1)
    summary.update(last_step=end, final=_final(rows))
    if rank == 0:
        write_metrics(out_dir, rows, summary)
    return summary


def _final(rows: list[dict]) -> dict:
    if not rows:
        return {}
    last = rows[-1]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    tail = rows[-max(1, len(rows) // 10):]
    times = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]
    return {
        "step": last["step"], "train_loss": last["loss"],
        "train_loss_tail_mean": sum(r["loss"] for r in tail) / len(tail),
        "val_loss": vals[-1] if vals else None,
        "median_step_time_s": sorted(times)[len(times) // 2],
        "tokens": last["tokens"],
    }
