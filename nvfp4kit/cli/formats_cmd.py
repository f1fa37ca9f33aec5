"""``nvfp4kit formats``: quantize a random or saved tensor and show what NVFP4 does to it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .app import app


@app.command("formats")
def formats_cmd(
    rows: int = typer.Option(256, help="rows of the random test tensor"),
    cols: int = typer.Option(1024, help="columns (a multiple of 16)"),
    seed: int = typer.Option(0, help="random seed"),
    outliers: float = typer.Option(0.0, help="fraction of elements multiplied by 20, to show outlier effects"),
) -> None:
    """Quantize a random Gaussian tensor with every nvfp4kit format and print the errors."""
    from ..pipelines.formats_report import format_error_report

    try:
        rows_out = format_error_report(rows, cols, seed, outliers)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title=f"quantization error of a {rows}x{cols} N(0,1) tensor")
    for c in ("format", "bits/elem", "rel. RMSE", "max abs err", "SQNR dB"):
        table.add_column(c, justify="right" if c != "format" else "left")
    for r in rows_out:
        table.add_row(r["format"], f"{r['bits']:.2f}", f"{r['rel_rmse']:.4f}", f"{r['max_abs']:.4f}", f"{r['sqnr_db']:.2f}")
    Console().print(table)
