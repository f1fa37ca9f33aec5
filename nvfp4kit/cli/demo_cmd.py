"""``nvfp4kit demo``: the main job end to end on the embedded model, no download needed."""

from __future__ import annotations

import typer
from rich.console import Console

from ..pipelines.demo import DemoJob
from . import options
from .app import app

D = DemoJob()


@app.command("demo")
def demo_cmd(
    out: str = typer.Option(D.out, "--out", help="where the checkpoint is written"),
    scheme: str = options.scheme(D.scheme, "w4a4 | w4a16"),
    weight_scale: str = options.weight_scale(D.weight_scale),
    format: str = options.checkpoint_format(D.format),
    calib_samples: int = options.calib_samples(D.calib_samples, "calibration samples (built-in text)"),
    seq_len: int = options.seq_len(D.seq_len),
    eval_tokens: int = typer.Option(D.eval_tokens, "--eval-tokens", help="held-out tokens for perplexity"),
    threads: int = typer.Option(D.threads, "--threads", min=1,
                                help="torch threads for the whole run (fixed so that machines agree on the figures)"),
) -> None:
    """Quantize the embedded SmolLM2-135M with built-in calibration text, write the checkpoint, reload it,
    and print fp32 vs NVFP4 perplexity on built-in held-out text."""
    from ..pipelines.demo import run_demo

    try:
        r = run_demo(DemoJob(out=out, scheme=scheme, weight_scale=weight_scale, format=format,
                             calib_samples=calib_samples, seq_len=seq_len, eval_tokens=eval_tokens,
                             threads=threads))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    c = Console()
    c.print(f"checkpoint: {r.path}")
    c.print(f"perplexity on {r.fp32.n_tokens} held-out tokens: fp32 {r.fp32.ppl:.3f}  "
            f"NVFP4 {scheme} ({weight_scale}) {r.quantized.ppl:.3f}  "
            f"(+{100 * (r.quantized.ppl / r.fp32.ppl - 1):.2f}%)")
