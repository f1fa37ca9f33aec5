"""``nvfp4kit eval``: perplexity (causal LMs) or embedding similarity (encoders) of a high-precision or
quantized model on a text, on the CPU or a GPU."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from . import options
from .app import app


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", help="HF folder, .gguf, or quantized checkpoint (default: the embedded SmolLM2)"),
    text: Optional[str] = typer.Option(None, "--text", help="evaluation text file (default: built-in held-out text)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="evaluate at most this many tokens"),
    weight_only: bool = typer.Option(False, "--weight-only", help="ignore static input scales (W4A16 emulation)"),
    against: Optional[str] = typer.Option(
        None, "--against",
        help="reference model (e.g. the source of a quantized checkpoint): causal LMs also report its perplexity "
             "and the gap; encoders are compared with it (required for them)"),
    max_sentences: int = typer.Option(256, "--max-sentences", help="encoders: sentences of the text to embed"),
    no_kv_cache: bool = typer.Option(
        False, "--no-kv-cache", help="ignore the checkpoint's FP8 / NVFP4 KV-cache scales (keys/values in full precision)"),
    device: str = options.device(),
    bos: bool = options.bos(),
) -> None:
    """Evaluate a model on a text.

    Causal LMs: perplexity over windows of --seq-len tokens. Encoders (e.g. a sentence-transformers
    BERT): cosine similarity of sentence embeddings to the --against model, and how often each
    sentence's nearest neighbour agrees. Quantized checkpoints are emulated: W4A4 activations are
    quantized per 16-block with the checkpoint's static scale, and an FP8 or NVFP4 KV cache
    quantizes the cached keys/values.
    """
    from ..pipelines.eval import run_eval

    try:
        r = run_eval(model, text, seq_len, max_tokens, weight_only=weight_only, against=against,
                     max_sentences=max_sentences, kv_cache=not no_kv_cache, device=device, bos=bos)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    out = Console()
    if r.similarity is not None:
        s = r.similarity
        out.print(f"{r.model} ({r.kind}) vs {r.reference}: embedding cosine mean {s.mean_cosine:.5f}, "
                  f"min {s.min_cosine:.5f}, nearest-neighbour agreement {s.neighbour_agreement:.1%} "
                  f"over {s.n_sentences} sentences ({r.seconds:.1f}s)")
        return
    out.print(f"{r.model} ({r.kind}): perplexity {r.result.ppl:.4f} over {r.result.n_tokens} tokens "
              f"(mean NLL {r.result.nll:.4f}, {r.seconds:.1f}s)"
              + (f", {r.kv_cache.upper()} KV cache emulated" if r.kv_cache else "")
              + (f", windows start with BOS (token {r.result.bos_id})" if r.result.bos_id is not None else ""))
    if r.reference_result is not None:
        out.print(f"{r.reference} (reference): perplexity {r.reference_result.ppl:.4f}; gap {r.ppl_gap:+.2%}")
    for w in r.warnings:  # a perplexity that is not finite: printed as inf / nan, the cause on stderr
        from rich.markup import escape

        Console(stderr=True).print(f"[bold]warning:[/bold] {escape(w)}", highlight=False)
