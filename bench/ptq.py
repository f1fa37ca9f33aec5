"""PTQ benchmark: nvfp4kit's recipes against every llm-compressor method that runs on CPU, per model.

On real causal LMs of two families that install offline (SmolLM2-135M-Instruct, the embedded model;
Qwen2.5-Coder-0.5B-Instruct when its GGUF is given with ``--qwen-gguf``, see ../shared/assets.md) and
real English text (the Python reference manual shipped with Python: calibration and evaluation parts
are disjoint), in one run, per model:

* perplexity of fp32, and of W4A16 and W4A4 for each nvfp4kit recipe (``--recipes``: weight scale,
  smoothing, rotation, and a static KV cache: ``+kv`` FP8, ``+nvfp4kv`` NVFP4, both emulated as served),
  each quantized from the same fp32 model on the same calibration tokens;
* llm-compressor on the same calibration tokens, each in a fresh child process, exported as
  compressed-tensors and evaluated with the same emulation (W4A4: activations quantized per 16-block
  with the checkpoint's static input global scale; W4A16: its weights only): its ``NVFP4`` preset
  (round to nearest), ``GPTQModifier`` with the ``NVFP4`` and ``NVFP4A16`` schemes, and
  ``AWQModifier`` with ``NVFP4A16`` followed by GPTQ (its best W4A16 recipe) where it runs;
* quantize time of every row (nvfp4kit: calibration included, in this process; llm-compressor: its
  whole ``oneshot``), and wall time and peak RSS of complete runs (load, calibrate, quantize, write) of
  nvfp4kit's default recipe and llm-compressor's GPTQ in fresh processes.

llm-compressor pins other package versions; it can live in its own environment:
``--llmc-python /path/to/venv/bin/python`` (default: this interpreter).

Usage: python bench/ptq.py [--models smollm2,qwen] [--qwen-gguf FILE] [--calib-samples 16] [--seq-len 256]
       [--eval-tokens 4096] [--threads 2] [--recipes max,gptq,gptq+awq,...] [--llmc-recipes rtn,gptq,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_ptq_peer_arguments, write_results_section  # noqa: E402

SECTION = "ptq"

# llm-compressor's methods, each a recipe built in the child: (label, what it is)
LLMC_RECIPES = {
    "rtn": "NVFP4 preset (QuantizationModifier, round to nearest)",
    "gptq": "GPTQModifier, NVFP4 scheme (W4A4)",
    "gptq-a16": "GPTQModifier, NVFP4A16 scheme (W4A16)",
    "awq-gptq-a16": "AWQModifier + GPTQModifier, NVFP4A16 scheme (W4A16)",
}

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
model_dir, samples_file, out, threads, recipe_name = sys.argv[1:6]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
ids = load_file(samples_file)["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
ignore = ["lm_head"]
if recipe_name == "rtn":
    recipe = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=ignore)
elif recipe_name == "gptq":
    recipe = GPTQModifier(targets="Linear", scheme="NVFP4", ignore=ignore)
elif recipe_name == "gptq-a16":
    recipe = GPTQModifier(targets="Linear", scheme="NVFP4A16", ignore=ignore)
elif recipe_name == "awq-gptq-a16":
    try:
        from llmcompressor.modifiers.awq import AWQModifier
    except ImportError:
        from llmcompressor.modifiers.transform.awq import AWQModifier
    recipe = [AWQModifier(targets="Linear", scheme="NVFP4A16", ignore=ignore, duo_scaling=False),
              GPTQModifier(targets="Linear", scheme="NVFP4A16", ignore=ignore)]
else:
    raise SystemExit(f"unknown recipe {recipe_name}")
t1 = time.perf_counter()
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1])
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
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
torch.set_num_threads(int(sys.argv[5]))
t0 = time.perf_counter()
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize
job = QuantizeJob(model=sys.argv[1], out=sys.argv[2], scheme="w4a4", calib_samples=int(sys.argv[3]),
                  seq_len=int(sys.argv[4]), format="compressed-tensors")
result, path = run_quantize(job)
t1 = time.perf_counter()
print("RESULT " + json.dumps({"total_s": t1 - t0, "peak_rss_mb": peak_rss_mb(),
      "recipe": f"{job.weight_scale}+{job.smooth}" + ("+rot" if job.rotate else "")}))
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



KV_PARTS = {"kv": "fp8", "nvfp4kv": "nvfp4"}  # recipe part -> static KV-cache format


def parse_recipe(text: str):
    """``"gptq+awq+rot"`` -> (weight scale, smoothing, rotate, sequential, KV-cache format (None, "fp8" for
    ``+kv``, "nvfp4" for ``+nvfp4kv``), GPTQ activation order)."""
    parts = text.split("+")
    unknown = set(parts[1:]) - {"awq", "smoothquant", "rot", "seq", "act", *KV_PARTS}
    if unknown:
        raise SystemExit(f"unknown recipe part(s) {sorted(unknown)} in {text!r}")
    kv = [KV_PARTS[p] for p in parts[1:] if p in KV_PARTS]
    if len(kv) > 1:
        raise SystemExit(f"recipe {text!r}: at most one KV-cache part ({', '.join(KV_PARTS)})")
    smooth = next((p for p in parts[1:] if p in ("awq", "smoothquant")), "none")
    return parts[0], smooth, "rot" in parts[1:], "seq" in parts[1:], (kv or [None])[0], "act" in parts[1:]


def hf_folder(path, dest: Path):
    """An fp32 HF folder of the model (both tools start from it; llm-compressor needs a config.json)."""
    from transformers import AutoModelForCausalLM

    from nvfp4kit.pipelines.models import load_source_model

    loaded = load_source_model(path)
    cfg = copy.deepcopy(loaded.model.config)
    if hasattr(cfg, "quantization_config"):  # the GGUF loader marks the model as GGUF-quantized
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(dest)
    loaded.tokenizer.save_pretrained(dest)
    del plain
    return loaded


def bench_model(label: str, path, args, work: Path) -> str:
    from safetensors.torch import save_file

    from nvfp4kit.calibrate import apply_kv_cache, apply_quantized, calibration_samples, load_text, quantize_model, sample_bos, tokenize
    from nvfp4kit.calibrate import weight_scales
    from nvfp4kit.calibrate.transforms import Transforms
    from nvfp4kit.evaluate import perplexity
    from nvfp4kit.pipelines.models import load_quantized_model
    from nvfp4kit.pipelines.quantize import QuantizeJob

    src = work / f"fp32-{label}"
    loaded = hf_folder(path, src)
    samples = calibration_samples(loaded.tokenizer, None, args.calib_samples, args.seq_len)
    bos = sample_bos(loaded.tokenizer)
    eval_ids = tokenize(loaded.tokenizer, load_text(None, "eval"))[: args.eval_tokens]
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"== {label}: {type(loaded.model).__name__}, {n_params / 1e6:.0f}M parameters; calibration "
          f"{tuple(samples.shape)} tokens, evaluation {eval_ids.numel()} tokens, BOS {bos}, {args.threads} threads",
          flush=True)

    def ppl(model, what):
        t0 = time.perf_counter()
        r = perplexity(model, eval_ids, args.eval_seq_len, bos_id=bos, desc=what)
        print(f"  {what:44s} ppl {r.ppl:9.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        return r.ppl

    fp32 = ppl(loaded.model, "fp32")
    rows = []  # (tool, recipe, scheme, ppl, quantize seconds)
    act_default = weight_scales.GPTQ_ACT_ORDER
    default = QuantizeJob()
    default_recipe = f"{default.weight_scale}+{default.smooth}" if default.smooth != "none" else default.weight_scale
    for recipe in args.recipes.split(","):
        ws, smooth, rot, seq, kv, act = parse_recipe(recipe)
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        weight_scales.GPTQ_ACT_ORDER = act  # (not a default: measured, it does not pay after AWQ smoothing)
        try:
            r = quantize_model(model, samples, "w4a4", ws, transforms=Transforms(rotate=rot, smooth=smooth),
                               sequential=seq, kv_cache=kv)
        finally:
            weight_scales.GPTQ_ACT_ORDER = act_default
        secs = time.perf_counter() - t0
        name = recipe + (" (default)" if recipe == default_recipe else "")
        for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
            mm = copy.deepcopy(model)
            apply_quantized(mm, r.qmodel, quantize_inputs=with_inputs)
            if kv:
                apply_kv_cache(mm, r.qmodel)
            rows.append(("nvfp4kit", name, scheme, ppl(mm, f"nvfp4kit {scheme} {recipe}"), secs))
            del mm
        del model, r
    runs = {}
    if not args.skip_llmc:
        save_file({"input_ids": samples.contiguous()}, str(work / "samples.safetensors"))
        for name in args.llmc_recipes.split(","):
            out = work / f"llmc-{label}-{name}"
            print(f"  child run: llm-compressor {name}", flush=True)
            try:
                t = run_child(args.llmc_python, LLMC_CHILD, [str(src), str(work / "samples.safetensors"), str(out),
                                                             str(args.threads), name])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                msg = str(e).strip().splitlines()[-1][:160]
                print(f"  llm-compressor {name} failed: {msg}", flush=True)
                rows.append((f"llm-compressor", LLMC_RECIPES[name], "fails", msg, None))
                continue
            runs[f"llm-compressor {t['version']} {name}"] = t
            schemes = (("W4A16", False),) if name.endswith("a16") else (("W4A16", False), ("W4A4", True))
            for scheme, with_inputs in schemes:
                q = load_quantized_model(out, quantize_inputs=with_inputs)
                rows.append((f"llm-compressor {t['version']}", LLMC_RECIPES[name], scheme,
                             ppl(q.model, f"llm-compressor {scheme} {name}"), t["quantize_s"]))
                del q
            shutil.rmtree(out, ignore_errors=True)
    del loaded
    print("  child run: nvfp4kit quantize (defaults)", flush=True)
    runs["nvfp4kit quantize (defaults)"] = run_child(
        sys.executable, OURS_CHILD, [str(src), str(work / f"ours-{label}"), str(args.calib_samples),
                                     str(args.seq_len), str(args.threads)])

    # ---------------------------------------------------------------- report
    lines = [
        f"### {label}",
        "",
        f"{n_params / 1e6:.0f}M parameters (the GGUF's weights dequantized to fp32 and saved as an HF folder both "
        f"tools start from). Calibration: {samples.shape[0]} x {samples.shape[1]} tokens of the built-in "
        f"calibration text; evaluation: {eval_ids.numel()} held-out tokens (windows of {args.eval_seq_len}"
        + (f", each starting with BOS {bos}" if bos is not None else "; the tokenizer adds no BOS") + "). "
        "Same tokens for every row.",
        "",
        "| tool | recipe | scheme | perplexity | gap to fp32 | gap vs best peer | quantize time (s) |",
        "|---|---|---|---:|---:|---:|---:|",
        f"| fp32 | - | - | {fp32:.4f} | - | - | - |",
    ]
    best_peer = {}
    for tool, recipe, scheme, p, _ in rows:
        if tool.startswith("llm-compressor") and scheme != "fails":
            best_peer[scheme] = min(best_peer.get(scheme, math.inf), p / fp32 - 1)
    for tool, recipe, scheme, p, secs in rows:
        if scheme == "fails":
            lines.append(f"| {tool} | {recipe} | - | fails: {p} | - | - | - |")
            continue
        gap = p / fp32 - 1
        vs = f"{gap / best_peer[scheme]:.2f}x" if best_peer.get(scheme, 0) > 0 else "-"
        lines.append(f"| {tool} | {recipe} | {scheme} | {p:.4f} | {100 * gap:+.2f}% | {vs} | "
                     f"{'-' if secs is None else f'{secs:.0f}'} |")
    lines += ["", "Complete quantize runs (fresh process: load, calibrate, quantize, write; same calibration tokens):",
              "", "| run | wall time (s) | peak RSS (MiB) |", "|---|---:|---:|"]
    for name, t in runs.items():
        lines.append(f"| {name} | {t['wall_s']:.0f} | {t['peak_rss_mb']:.0f} |")
    ours = [r for r in rows if r[0] == "nvfp4kit" and r[1].endswith("(default)")]
    for scheme in ("W4A4", "W4A16"):
        mine = next((r for r in ours if r[2] == scheme), None)
        if mine is not None and best_peer.get(scheme, 0) > 0:
            lines.append("")
            lines.append(f"{scheme}: nvfp4kit's default ({mine[1]}) gap {100 * (mine[3] / fp32 - 1):+.2f}% is "
                         f"{(mine[3] / fp32 - 1) / best_peer[scheme]:.2f}x the best llm-compressor method's "
                         f"({100 * best_peer[scheme]:+.2f}%).")
    gptq_run = next((t for n, t in runs.items() if n.endswith(" gptq")), None)
    if gptq_run is not None:
        lines.append("")
        lines.append(f"Complete run time: nvfp4kit defaults {runs['nvfp4kit quantize (defaults)']['wall_s']:.0f}s vs "
                     f"llm-compressor GPTQModifier {gptq_run['wall_s']:.0f}s "
                     f"({runs['nvfp4kit quantize (defaults)']['wall_s'] / gptq_run['wall_s']:.2f}x).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,qwen", help="smollm2 (embedded), qwen (needs --qwen-gguf)")
    ap.add_argument("--qwen-gguf", default=None, help="Qwen2.5-Coder-0.5B-Instruct GGUF (see ../shared/assets.md)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--recipes", default="max,max+awq,gptq,gptq+act,gptq+smoothquant,gptq+awq,gptq+awq+act,"
                                         "gptq+awq+rot,gptq+rot,gptq+awq+kv,gptq+awq+nvfp4kv",
                    help="nvfp4kit recipes: weight scale [+awq|+smoothquant] [+rot] [+seq: sequential calibration] "
                         "[+kv: static FP8 KV cache | +nvfp4kv: static NVFP4 KV cache] [+act: GPTQ in activation order]")
    ap.add_argument("--llmc-recipes", default=",".join(LLMC_RECIPES))
    add_ptq_peer_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nvfp4kit.pipelines.models import embedded_model_path

    paths = {"smollm2": ("SmolLM2-135M-Instruct", embedded_model_path()),
             "qwen": ("Qwen2.5-Coder-0.5B-Instruct", args.qwen_gguf)}
    work = Path(tempfile.mkdtemp(prefix="ptq-bench-work-"))
    try:
        for key in args.models.split(","):
            label, path = paths[key]
            if path is None:
                print(f"skipping {label}: give its GGUF with --qwen-gguf", flush=True)
                continue
            body = bench_model(label, path, args, work)
            text = "\n".join([
                f"## PTQ: NVFP4 {label} against every llm-compressor method (`bench/ptq.py`)", "",
                "W4A4 = NVFP4 weights and activations (1x16 blocks, static calibrated global scale), emulated on "
                "CPU the same way for both tools; W4A16 = NVFP4 weights only. Gap vs best peer: this row's "
                "perplexity gap as a multiple of the best llm-compressor method's gap for the same scheme (below "
                f"1x: closer to fp32). {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
                "times are wall-clock on this (possibly shared) machine.", "", body])
            print("\n" + text, flush=True)
            write_results_section(f"{SECTION}-{key}", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
