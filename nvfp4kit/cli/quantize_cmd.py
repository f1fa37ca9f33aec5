"""``nvfp4kit quantize``: calibrate and quantize a model, write a modelopt or compressed-tensors checkpoint."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console

from ..pipelines.quantize import QuantizeJob
from . import options
from .app import app

D = QuantizeJob()


@app.command("quantize")
def quantize_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"),
    out: str = typer.Option(..., "--out", help="output checkpoint folder (written atomically)"),
    format: str = options.checkpoint_format(D.format),
    scheme: str = options.scheme(D.scheme, "w4a4 | w4a16 | fp8 | mixed"),
    weight_scale: str = options.weight_scale(D.weight_scale),
    calib: Optional[str] = typer.Option(
        None, "--calib", help="calibration text: .txt/.jsonl/.json/.parquet/.csv file or folder (default: built-in)"),
    calib_samples: int = options.calib_samples(D.calib_samples, "number of calibration samples"),
    seq_len: int = options.seq_len(D.seq_len),
    exclude: Optional[List[str]] = typer.Option(
        None, "--exclude", help="fnmatch pattern of modules kept in high precision (repeatable)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="precision preset, e.g. nemotron3-super"),
    bits_budget: Optional[float] = typer.Option(
        None, "--bits-budget",
        help="with --scheme mixed: choose NVFP4 / FP8 / BF16 per Linear by measured sensitivity under this "
             "average bits per weight (NVFP4 counts 4.5 with its scales, FP8 8, BF16 16), e.g. 4.75"),
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache",
        help="fp8 or nvfp4: also calibrate static FP8 / NVFP4 KV-cache scales (post-RoPE keys and values, per "
             "attention layer; nvfp4: 1x16 blocks along the head dim, served with vLLM --kv-cache-dtype nvfp4)"),
    sequential: Optional[bool] = typer.Option(
        None, "--sequential/--one-shot",
        help="calibrate each block on the outputs of the already-quantized blocks before it (GPTQ Hessians and "
             "activation scales match what the quantized model sees), or all blocks on the full-precision model; "
             "default: one-shot when the model is loaded whole, sequential block by block"),
    load: str = typer.Option(
        D.load, "--load",
        help="whole: load the model into memory; blocks: keep it on disk and quantize one block at a time (memory "
             "peak: one block + calibration activations + one shard; resumable: run the same command again); "
             "auto: whole when it fits in half the free memory of the device"),
    device: str = options.device(D.device),
    bos: bool = options.bos(D.bos),
    smooth: str = typer.Option(
        D.smooth, "--smooth",
        help="per-channel smoothing folded into the model before quantization (a standard checkpoint): awq (search "
             "of the migration strength per group by its NVFP4 output error; the default: measured, it halves the W4A4 "
             "gap of a model that was not smoothed before, and costs little on one that was), smoothquant (closed "
             "form, alpha 0.5) or none; --method auto chooses per model"),
    rotate: bool = typer.Option(
        D.rotate, "--rotate/--no-rotate",
        help="fold a randomized block-Hadamard rotation of the residual stream and of each value head into the "
             "weights (QuaRot-style, no engine support needed; Llama/Mistral/Qwen-style decoders, --load whole). "
             "Off by default: measured, it does not pay for NVFP4 W4A4"),
    method: str = typer.Option(
        D.method, "--method",
        help="given: quantize with the options as given; auto: try the candidate recipes (smoothing awq / none / "
             "smoothquant, awq + rotation) on 75 percent of the calibration samples, score each quantized model on "
             "the rest, keep the best (several times the time; causal LMs, --load whole)"),
    dtype: str = typer.Option(
        D.dtype, "--dtype", help="compute dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, "
                                 "float16; statistics and scale searches are float32 in any case"),
    activation_memory: Optional[float] = typer.Option(
        None, "--activation-memory",
        help="block by block: GB of calibration activations kept in memory (the rest spills to disk beside "
             "--out); default 15 percent of the free memory"),
    max_shard_size: str = typer.Option(D.max_shard_size, "--max-shard-size", help="output shard size, e.g. 5GB"),
    weights_only_streaming: bool = typer.Option(
        False, "--weights-only-streaming",
        help="weight-only (W4A16 / FP8 weights) conversion one tensor at a time, without loading the model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Quantize a model to NVFP4 (or FP8 / mixed) with calibration and write the checkpoint."""
    from ..pipelines.quantize import run_quantize, run_streaming

    console = Console()
    job = QuantizeJob(model=model, out=out, format=format, scheme=scheme, weight_scale=weight_scale, calib=calib,
                      calib_samples=calib_samples, seq_len=seq_len, exclude=tuple(exclude or ()), recipe=recipe,
                      overwrite=overwrite, bits_budget=bits_budget, kv_cache=kv_cache,
                      sequential=sequential, load=load, device=device, dtype=dtype,
                      activation_memory=activation_memory, max_shard_size=max_shard_size, bos=bos, smooth=smooth,
                      rotate=rotate, method=method)
    try:
        if weights_only_streaming:
            path = run_streaming(job)
            console.print(f"wrote {path}")
            return
        result, path = run_quantize(job)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    if not _is_main():
        return
    counts = result.plan.counts()
    console.print(
        f"quantized {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} Linears "
        f"(scheme {scheme}, weight scale {weight_scale}, {result.n_calib_tokens} calibration tokens)"
    )
    if result.qmodel.kv_cache_format:
        console.print(f"{result.qmodel.kv_cache_format.upper()} KV cache: static scales for "
                      f"{len(result.qmodel.kv_cache_amax)} attention layers")
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    console.print(f"wrote {path}")


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
