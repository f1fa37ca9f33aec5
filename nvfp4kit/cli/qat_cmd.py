"""``nvfp4kit qat``: quantization-aware training (QAT) or distillation from the BF16 model (QAD)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..pipelines.qat import QATJob
from . import options
from .app import app

D = QATJob()


@app.command("qat")
def qat_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="HF model folder, .gguf file or Nemotron 3 hybrid folder (default: the embedded SmolLM2-135M)"),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="training text: .txt/.jsonl/.parquet/.csv file or folder (default: built-in)"),
    steps: int = typer.Option(D.steps, "--steps", help="optimizer steps"),
    out: str = typer.Option(..., "--out", "-o", help="output checkpoint folder (training state goes to OUT.qat/)"),
    distill: bool = typer.Option(False, "--distill", help="QAD: KL to the frozen full-precision model's logits"),
    scheme: str = options.scheme(D.scheme, "w4a4 (NVFP4 weights and activations) or w4a16"),
    fmt: str = options.checkpoint_format(D.format),
    lr: float = typer.Option(D.lr, "--lr", help="peak learning rate (AdamW; warm-up then cosine to 10%)"),
    warmup: int = typer.Option(D.warmup, "--warmup", help="warm-up steps"),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="sequences per step"),
    seq_len: int = options.seq_len(D.seq_len, "tokens per sequence"),
    seed: int = typer.Option(D.seed, "--seed", help="data-order seed"),
    temperature: float = typer.Option(D.temperature, "--temperature", help="distillation temperature"),
    ce_weight: float = typer.Option(D.ce_weight, "--ce-weight", help="with --distill: add this times the next-token loss"),
    trainable: str = typer.Option(D.trainable, "--trainable",
                                  help="quantized (the fake-quantized Linears) or all parameters"),
    weight_amax: str = typer.Option(D.weight_amax, "--weight-amax",
                                    help="weight global amax: dynamic (recomputed) or fixed (initial/PTQ value)"),
    weight_scale: str = options.weight_scale(D.weight_scale, "max | mse | 4over6"),
    calib_samples: int = options.calib_samples(D.calib_samples, "calibration sequences for the activation amax"),
    eval_tokens: int = typer.Option(D.eval_tokens, "--eval-tokens", help="held-out tokens (end of the data) for perplexity"),
    ptq: Optional[str] = typer.Option(None, "--ptq", help="initialise formats and activation scales from this PTQ checkpoint"),
    weights_from_ptq: bool = typer.Option(False, "--weights-from-ptq", help="with --ptq: start from its dequantized weights"),
    plan: Optional[str] = typer.Option(None, "--plan", help="mixed-precision plan JSON (from quantize --scheme mixed)"),
    exclude: List[str] = typer.Option([], "--exclude", "-x", help="fnmatch pattern kept in high precision (repeatable)"),
    save_every: int = typer.Option(D.save_every, "--save-every", help="training checkpoint interval (steps)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest training checkpoint in OUT.qat/"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
    device: str = options.device(D.device),
    bos: bool = options.bos(D.bos),
) -> None:
    """Train through the NVFP4 quantizer (straight-through estimator) and export the quantized checkpoint."""
    from ..pipelines.qat import run_qat

    job = QATJob(model=model, data=data, out=out, steps=steps, distill=distill, scheme=scheme, format=fmt, lr=lr,
                 warmup=warmup, batch_size=batch_size, seq_len=seq_len, seed=seed, temperature=temperature,
                 ce_weight=ce_weight, trainable=trainable, weight_amax=weight_amax, weight_scale=weight_scale,
                 calib_samples=calib_samples, eval_tokens=eval_tokens, ptq=ptq, weights_from_ptq=weights_from_ptq,
                 plan=plan, exclude=tuple(exclude), save_every=save_every, resume=resume, overwrite=overwrite,
                 device=device, bos=bos)
    try:
        result = run_qat(job)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title=f"{'QAD' if distill else 'QAT'} {scheme}: {result.steps} steps, {result.tokens_trained} tokens")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, v in (("train loss (first step)", result.loss_first), ("train loss (last step)", result.loss_last),
                     ("held-out ppl before", result.ppl_before), ("held-out ppl after", result.ppl_after)):
        table.add_row(label, "-" if v is None else f"{v:.4f}")
    table.add_row("seconds", f"{result.seconds.get('total', 0.0):.1f}")
    table.add_row("checkpoint", str(result.out))
    Console().print(table)
