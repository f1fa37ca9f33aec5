"""``nvfp4kit eval``: perplexity of a high-precision or quantized model on a text, on CPU."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from .app import app


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", help="HF folder, .gguf, or quantized checkpoint (default: the embedded SmolLM2)"),
    text: Optional[str] = typer.Option(None, "--text", help="evaluation text file (default: built-in held-out text)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="evaluate at most this many tokens"),
    weight_only: bool = typer.Option(False, "--weight-only", help="ignore static input scales (W4A16 emulation)"),
    no_kv_cache: bool = typer.Option(
        False, "--no-kv-cache", help="ignore the checkpoint's FP8 KV-cache scales (keys/values in full precision)"),
) -> None:
    """Perplexity (W4A4 checkpoints emulated: activations quantized per 16-block with the static scale;
    an FP8 KV cache quantizes the cached keys/values)."""
    from ..pipelines.eval import run_eval

    try:
        r = run_eval(model, text, seq_len, max_tokens, weight_only=weight_only, kv_cache=not no_kv_cache)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    Console().print(f"{r.model} ({r.kind}): perplexity {r.result.ppl:.4f} over {r.result.n_tokens} tokens "
                    f"(mean NLL {r.result.nll:.4f}, {r.seconds:.1f}s)"
                    + (f", {r.kv_cache.upper()} KV cache emulated" if r.kv_cache else ""))
