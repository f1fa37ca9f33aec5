"""``nvfp4kit inspect``: per-layer table of a quantized checkpoint, optional error chart."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import options
from .app import app


def _f(v, fmt=".3g"):
    return "-" if v is None else format(v, fmt)


@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="quantized checkpoint folder"),
    against: Optional[str] = typer.Option(None, "--against", help="source model (HF folder or .gguf) to measure error"),
    plot: Optional[str] = typer.Option(None, "--plot", help="write a PNG chart of the per-layer error"),
    device: str = options.device("cpu"),
    check_serving: bool = typer.Option(False, "--check-serving",
                                       help="only check the checkpoint against what vLLM's and SGLang's NVFP4 / FP8 "
                                            "loaders require; exit 1 when it fails"),
) -> None:
    """Format, shape, scale statistics and (with --against) relative weight error of each Linear."""
    from ..evaluate.report import natural_key
    from ..pipelines.inspect import inspect_checkpoint

    if check_serving:
        _check_serving(path)
        return
    try:
        r = inspect_checkpoint(path, against, plot, device=device)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title=f"{r.path} ({r.format}): {len(r.rows)} quantized Linears, {r.n_tensors} other tensors")
    table.add_column("module", overflow="fold", min_width=24)
    for c in ("format", "shape", "global scale", "block scale min", "mean", "max", "input amax", "rel. error"):
        table.add_column(c, justify="left" if c == "format" else "right")
    for row in sorted(r.rows, key=lambda x: natural_key(x.name)):
        table.add_row(row.name, row.format, "x".join(map(str, row.shape)), _f(row.global_scale),
                      _f(row.block_scale_min), _f(row.block_scale_mean), _f(row.block_scale_max),
                      _f(row.input_amax), _f(row.rel_error, ".4f"))
    console = Console(width=max(Console().width, 150))
    console.print(table)
    if r.exclude_modules:
        console.print(f"kept in high precision: {', '.join(r.exclude_modules[:12])}"
                      + (" ..." if len(r.exclude_modules) > 12 else ""))
    if r.kv_cache_format:
        ks = [k for k, _ in r.kv_cache_amax.values()]
        vs = [v for _, v in r.kv_cache_amax.values()]
        console.print(f"{r.kv_cache_format.upper()} KV cache: static scales for {len(r.kv_cache_amax)} attention layers"
                      + (f" (key amax {min(ks):.4g}..{max(ks):.4g}, value amax {min(vs):.4g}..{max(vs):.4g})"
                         if ks else ""))
    if r.problems:
        from rich.markup import escape

        console.print(f"[bold]warning:[/bold] {len(r.problems)} tensor(s) hold broken values (NaN / infinite / "
                      "negative / zero scales, non-finite weights): the checkpoint is corrupt")
        for problem in r.problems:
            console.print(f"  - {escape(problem)}", highlight=False, soft_wrap=True)
    if r.plot is not None:
        console.print(f"wrote {r.plot}")


def _check_serving(path: str) -> None:
    from pathlib import Path

    from ..checkpoint.serving import check_serving, errors

    if not Path(path).is_dir():
        raise typer.BadParameter(f"{path!r} is not a checkpoint folder", param_hint="PATH")
    findings = check_serving(path)
    bad = errors(findings)
    console = Console(width=max(Console().width, 150), highlight=False)
    for f in findings:
        console.print(f"{'error' if f in bad else 'warning'}: {f}", markup=False)
    if bad:
        console.print(f"{path}: {len(bad)} problem(s) vLLM / SGLang would refuse or serve wrongly", markup=False)
        raise typer.Exit(1)
    console.print(f"{path}: passes the vLLM / SGLang serving checks"
                  + (f" ({len(findings)} warning(s))" if findings else ""), markup=False)
