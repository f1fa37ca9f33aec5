"""``nvfp4kit convert``: rewrite a checkpoint in another format, dequantize it, or weight-only
quantize a high-precision checkpoint tensor by tensor (memory bounded by about one shard)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app


def _summary(out: Path, title: str) -> None:
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    total = 0
    for p in sorted(out.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            total += size
            table.add_row(p.name, f"{size / 1e6:.2f} MB")
    table.add_row("[bold]total", f"[bold]{total / 1e6:.2f} MB")
    Console().print(table)


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="source checkpoint directory (safetensors)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist unless --overwrite)"),
    to: str = typer.Option(
        "modelopt", "--to", help="output format: modelopt, compressed-tensors, or bf16 (dequantize)"
    ),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="weight-only quantize a high-precision checkpoint: nvfp4 or fp8"
    ),
    exclude: List[str] = typer.Option(
        [], "--exclude", "-x", help="fnmatch pattern of modules kept in high precision (repeatable; with --quantize)"
    ),
    default_exclude: bool = typer.Option(
        True, "--default-exclude/--no-default-exclude",
        help="also keep embeddings, lm_head and MoE routers in high precision (with --quantize)",
    ),
    max_shard_size: Optional[str] = typer.Option(
        None, "--max-shard-size", help="output shard size, e.g. 2GB (default: the largest source file)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output directory"),
) -> None:
    """Convert between modelopt and compressed-tensors (exact), dequantize (--to bf16), or
    quantize a bf16/fp32 checkpoint one tensor at a time (--quantize nvfp4)."""
    from ..checkpoint import CheckpointError
    from ..checkpoint.convert import convert_checkpoint
    from ..checkpoint.streaming import quantize_checkpoint

    try:
        if quantize is not None:
            if to not in ("modelopt", "compressed-tensors"):
                raise typer.BadParameter("with --quantize, --to must be modelopt or compressed-tensors", param_hint="--to")
            path = quantize_checkpoint(
                src, out, quantize, exclude, format=to, use_default_exclude=default_exclude,
                max_shard_size=max_shard_size, overwrite=overwrite,
            )
            title = f"{src.name} -> {quantize} weight-only ({to})"
        else:
            if exclude:
                raise typer.BadParameter("--exclude applies only with --quantize", param_hint="--exclude")
            path = convert_checkpoint(src, out, to, max_shard_size=max_shard_size, overwrite=overwrite)
            title = f"{src.name} -> {to}"
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    _summary(path, title)
