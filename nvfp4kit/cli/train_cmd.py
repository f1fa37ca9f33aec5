"""``nvfp4kit train``: pretrain a model preset with an NVFP4 recipe on local text.

Multi-process data parallel: ``torchrun --nproc-per-node 2 -m nvfp4kit.cli train ...``.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from . import options
from .app import app


@app.command("train")
def train_cmd(
    data: List[str] = typer.Option(
        ..., "--data", help="UTF-8 text file (one document), .jsonl/.json/.parquet/.csv (one document per "
                            "record's 'text'), directory of *.txt, or glob (repeatable)"),
    out: str = typer.Option(..., "--out", help="run directory: metrics, loss.png, checkpoints"),
    preset: str = typer.Option("tiny", help="model preset (nvfp4kit model presets)"),
    model_set: List[str] = typer.Option([], "--model-set", help="override a preset field: KEY=VALUE (repeatable)"),
    recipe: str = typer.Option("nemotron3", help="precision recipe: nemotron3, paper-12b, all-nvfp4, bf16"),
    flag: List[str] = typer.Option([], "--flag", help="NVFP4 switch: no-2d, no-rht, no-sr, 4over6, rht-size=N, "
                                                      "rht-sign=+-... (repeatable)"),
    steps: int = typer.Option(100, help="optimizer steps"),
    batch_size: int = typer.Option(8, help="sequences per step, all ranks together"),
    seq_len: int = typer.Option(256, help="tokens per sequence"),
    lr: float = typer.Option(3e-3, help="peak learning rate"),
    min_lr_ratio: float = typer.Option(0.1, help="final learning rate / peak"),
    warmup: int = typer.Option(10, help="warmup steps"),
    schedule: str = typer.Option("cosine", help="cosine or wsd"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (matrices only)"),
    grad_clip: float = typer.Option(1.0, help="gradient norm clip (0: off)"),
    eval_every: int = typer.Option(50, help="validation every N steps (0: only never)"),
    ckpt_every: int = typer.Option(100, help="checkpoint every N steps (and at the end)"),
    seed: int = typer.Option(0, help="model init, data order and rounding seed"),
    tokenizer: Optional[str] = typer.Option(None, help="local tokenizer directory (default: bytes)"),
    val_fraction: float = typer.Option(0.05, help="held-out fraction of the packed sequences"),
    autocast: str = typer.Option("auto", help="bf16 autocast: auto, bf16, off"),
    parallel: str = typer.Option("auto", help="under torchrun: auto (FSDP2, else DDP), fsdp2, ddp"),
    backend: str = typer.Option("emulated", help="emulated, or te (Transformer Engine NVFP4, sm100+ GPUs)"),
    device: str = options.device("auto"),
    resume: bool = typer.Option(True, help="continue from the latest checkpoint in --out"),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="remove the earlier run's checkpoints and metrics in --out and start again (a new run where an earlier "
             "one left its files is refused otherwise)"),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", min=1,
        help="end (with a checkpoint) after this many steps of this invocation, e.g. to fit a job time limit; "
             "run again with the same options to continue"),
) -> None:
    """Train a model preset with a low-precision recipe; prints each Linear's precision first."""
    from ..pipelines.train import TrainOptions, run_training
    from ..training.loop import TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, min_lr_ratio=min_lr_ratio,
                      warmup=warmup, schedule=schedule, weight_decay=weight_decay, grad_clip=grad_clip,
                      eval_every=eval_every, ckpt_every=ckpt_every, seed=seed, autocast=autocast)
    try:
        overrides = _parse_overrides(model_set)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model-set") from e
    opts = TrainOptions(out=out, preset=preset, model_overrides=overrides, recipe=recipe, flags=tuple(flag), data=list(data),
                        tokenizer=tokenizer, val_fraction=val_fraction, train=cfg, parallel=parallel,
                        backend=backend, device=device, resume=resume, overwrite=overwrite,
                        stop_after=stop_after)
    try:
        summary = run_training(opts)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    final = summary.get("final", {})
    if summary.get("world_size", 1) == 1 or _is_main():
        typer.echo(
            f"done: step {final.get('step')}  train loss {final.get('train_loss', float('nan')):.4f}  "
            f"val loss {final.get('val_loss') if final.get('val_loss') is not None else 'n/a'}  "
            f"median step {final.get('median_step_time_s', float('nan')):.3f}s  -> {out}"
        )


def _parse_overrides(items) -> dict:
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
