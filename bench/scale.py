"""PTQ at scale: memory and time of block-by-block quantization from disk, against the whole model
in memory and against llm-compressor, in one run.

Parts (``--parts``, comma-separated; all by default):

* ``depth``: synthetic Llama-shaped bf16 checkpoints of one width (Llama-3.2-1B widths: hidden 2048,
  MLP 8192, 32/8 heads, vocab 128256) and growing depth. Per depth: peak RSS and wall time of a
  calibrated W4A4 quantize run (``max`` and ``gptq``) block by block (``--load blocks``), the same
  with the whole model in memory (``--load whole``), and llm-compressor's sequential pipeline on the
  same checkpoint and tokens (its ``QuantizationModifier`` NVFP4, and ``GPTQModifier`` NVFP4).
* ``8b``: a Llama-3-8B-shaped checkpoint (hidden 4096, MLP 14336, 32 blocks, 8.0B parameters, 16 GB
  in bf16, 32 GB in fp32: more than this machine's RAM) quantized block by block with few
  calibration tokens; llm-compressor on the same checkpoint.
* ``super``: a Nemotron 3 Super-shaped checkpoint (the released widths: hidden 4096, 512 routed
  experts of 2688 on latent 1024, Mamba 128x64, attention 32/2 heads, MTP) with a few blocks, through
  ``--scheme mixed --recipe nemotron3-super``: peak RSS and time per block type, extrapolated to
  the 88 blocks (and MTP) of the release.
* ``gptq``: end-to-end W4A4 GPTQ of a real model (the embedded SmolLM2-135M, and Qwen2.5-0.5B when
  its GGUF is given with ``--qwen-gguf``): nvfp4kit against llm-compressor's ``GPTQModifier``
  (NVFP4 scheme, sequential pipeline) on the same tokens: wall time and perplexity (same emulated
  W4A4 evaluation for both).
* ``head``: calibration time of the same models with the output head computed (every forward runs
  to the logits, as calibration did before) and without it (the forward stops after the last block).

The synthetic checkpoints have random weights: they measure memory and time, not accuracy. Each
quantize run is a fresh child process; peak RSS is its ``VmHWM`` (resident memory, including the
pages of memory-mapped source shards it touched). llm-compressor pins other package versions: give
its interpreter with ``--llmc-python``.

Usage: python bench/scale.py [--parts depth,8b,super,gptq,head] [--depths 2,4,8,16] [--work DIR]
       [--llmc-python PY] [--qwen-gguf FILE] [--device cpu]
"""

from __future__ import annotations

import argparse
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
from results import cpu_model, write_results_section  # noqa: E402

SECTION = "scale"
GIB = 1024**3

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256)

# --------------------------------------------------------------------------- child processes

_RSS = r'''
import threading, time
def _vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0
class RssSampler:
    """Samples VmRSS every 50 ms; ``mark()`` returns the peak since the previous mark."""
    def __init__(self):
        self.peak = 0.0
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()
    def _run(self):
        while True:
            v = _vm("VmRSS")
            with self.lock:
                self.peak = max(self.peak, v)
            time.sleep(0.05)
    def mark(self):
        with self.lock:
            p, self.peak = self.peak, _vm("VmRSS")
        return p
'''

OURS = _RSS + r'''
import json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args.pop("threads"))
t0 = time.perf_counter()
sampler = RssSampler()
from nvfp4kit import progress
marks = []
class Stream:
    def write(self, text):
        for line in text.splitlines():
            if "quantizing blocks:" in line:
                marks.append((time.perf_counter() - t0, sampler.mark(), line.strip()))
    def flush(self):
        pass
progress.use_lines(Stream(), interval=0.0)
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize
result, path = run_quantize(QuantizeJob(**args))
print("RESULT " + json.dumps({"total_s": time.perf_counter() - t0, "peak_rss_mb": _vm("VmHWM"),
      "seconds": result.seconds, "marks": marks}))
'''

LLMC = _RSS + r'''
import json, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
t0 = time.perf_counter()
from datasets import Dataset
from safetensors.torch import load_file
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype="auto")
tok = AutoTokenizer.from_pretrained(args["model"])
ids = load_file(args["samples"])["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
Modifier = GPTQModifier if args["method"] == "gptq" else QuantizationModifier
recipe = Modifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])
t1 = time.perf_counter()
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, pipeline="sequential",
        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
t2 = time.perf_counter()
model.save_pretrained(args["out"], save_compressed=True)
tok.save_pretrained(args["out"])
import llmcompressor
print("RESULT " + json.dumps({"total_s": time.perf_counter() - t0, "load_s": t1 - t0, "oneshot_s": t2 - t1,
      "peak_rss_mb": _vm("VmHWM"), "version": llmcompressor.__version__}))
'''


def run_child(python: str, code: str, args: dict, timeout: float) -> dict:
    """Run ``code`` in a fresh process; its RESULT line, or ``{"error": ...}`` (OOM kill, timeout, failure)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
        script = f.name
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([python, script, json.dumps(args)], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s", "wall_s": time.perf_counter() - t0}
    finally:
        os.unlink(script)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory)" if proc.returncode in (-9, 137) else f"rc {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{why}: {tail[0][-200:]}", "wall_s": wall}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = wall
    return out


# --------------------------------------------------------------------------- synthetic checkpoints


def _tokenizer():
    from transformers import AutoTokenizer

    from nvfp4kit.pipelines.models import embedded_model_path

    gguf = embedded_model_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _randn(shape, gen, std=0.02):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.bfloat16)


def write_llama(folder: Path, layers: int, widths: dict, tokenizer) -> Path:
    """A Llama-shaped bf16 HF checkpoint with random weights, one safetensors shard per block."""
    from safetensors.torch import save_file

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h, f, nh, nkv, v = (widths[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "vocab_size"))
    hd = h // nh
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  num_hidden_layers=layers, head_dim=hd, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **widths)
    gen = torch.Generator().manual_seed(layers)
    index = {}
    shapes = {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h), "self_attn.v_proj": (nkv * hd, h),
              "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    total = 0

    def write(name, tensors):  # one shard at a time: the whole model is never in memory
        nonlocal total
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            index[k] = name
            total += t.numel() * t.element_size()

    write("model-embed.safetensors", {"model.embed_tokens.weight": _randn((v, h), gen, 1.0)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + n + ".weight": _randn(s, gen) for n, s in shapes.items()}
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        write(f"model-{i:05d}.safetensors", t)
        del t
    write("model-head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                     "lm_head.weight": _randn((v, h), gen)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def write_super(folder: Path, pattern: str, tokenizer) -> Path:
    """A Nemotron 3 Super-shaped bf16 checkpoint (released widths and names) with ``pattern`` blocks
    and the MTP, random weights, one shard per block (``nvfp4kit.model`` builds it on the meta
    device and fills it tensor by tensor)."""
    from safetensors.torch import save_file

    from nvfp4kit.model.lm import build_model
    from nvfp4kit.model.presets import get_preset

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = get_preset("nemotron3-super-120b-a12b", hybrid_override_pattern=pattern, torch_dtype="bfloat16",
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = build_model(cfg, device="meta")
    gen = torch.Generator().manual_seed(7)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.state_dict(keep_vars=True).items():
        parts = name.split(".")
        if parts[0] == "backbone" and parts[1] == "layers":
            shard = f"model-layer{int(parts[2]):03d}.safetensors"
        elif parts[0] == "mtp":
            shard = f"model-mtp{int(parts[2]):02d}.safetensors"
        else:
            shard = "model-other.safetensors"
        groups.setdefault(shard, []).append((name, p))

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        leaf = name.rsplit(".", 2)[-1]
        owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(p.shape, dtype=torch.float32)
        if leaf == "A_log":
            return torch.log(torch.linspace(1, 16, p.shape[0])).to(torch.bfloat16)
        if leaf == "dt_bias":
            return torch.full(p.shape, -3.0, dtype=torch.bfloat16)
        if leaf == "D" or (leaf == "weight" and "norm" in owner):
            return torch.ones(p.shape, dtype=torch.bfloat16)
        if leaf == "bias":
            return torch.zeros(p.shape, dtype=torch.bfloat16)
        return _randn(p.shape, gen, 1.0 if "embeddings" in name else 0.02)

    index, total = {}, 0
    for shard, members in groups.items():  # one shard in memory at a time (a 512-expert layer is ~6 GB)
        tensors = {name: value(name, p) for name, p in members}
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        for k, t in tensors.items():
            index[k] = shard
            total += t.numel() * t.element_size()
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    cfg.save_json(tmp / "config.json")
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- runs


class Runner:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.samples_file = work / "samples.safetensors"

    def samples(self, tokenizer):
        """The calibration tokens both tools get: nvfp4kit's own sampling of its built-in text."""
        from safetensors.torch import save_file

        from nvfp4kit.calibrate import calibration_samples

        ids = calibration_samples(tokenizer, None, self.args.calib_samples, self.args.seq_len)
        save_file({"input_ids": ids.contiguous()}, str(self.samples_file))
        return ids

    def ours(self, model: Path, method: str, load: str, label: str, **job) -> dict:
        out = self.work / "out-ours"
        shutil.rmtree(out, ignore_errors=True)
        args = dict(model=str(model), out=str(out), scheme="w4a4", weight_scale=method, load=load,
                    calib_samples=self.args.calib_samples, seq_len=self.args.seq_len, device=self.args.device,
                    threads=self.args.threads, overwrite=True, smooth=self.args.smooth, **job)
        print(f"  nvfp4kit {label} ...", flush=True)
        r = run_child(sys.executable, OURS, args, self.args.timeout)
        self._say(f"nvfp4kit {label}", r)
        if "error" not in r:
            r["out_bytes"] = folder_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def llmc(self, model: Path, method: str, label: str) -> dict | None:
        if self.args.skip_llmc:
            return None
        out = self.work / "out-llmc"
        shutil.rmtree(out, ignore_errors=True)
        args = dict(model=str(model), samples=str(self.samples_file), out=str(out), method=method,
                    threads=self.args.threads)
        print(f"  llm-compressor {label} ...", flush=True)
        r = run_child(self.args.llmc_python, LLMC, args, self.args.timeout)
        self._say(f"llm-compressor {label}", r)
        r["out"] = out
        return r

    @staticmethod
    def _say(label, r):
        if "error" in r:
            print(f"    {label}: {r['error']} after {r['wall_s']:.0f}s", flush=True)
        else:
            print(f"    {label}: {r['wall_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "fails: " + r["error"].split(":")[0]
    return format(r[key], fmt)


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def llama_block_bytes(widths: dict) -> int:
    h, f, nh, nkv = (widths[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads"))
    hd = h // nh
    return 2 * (2 * nh * hd * h + 2 * nkv * hd * h + 3 * f * h)


def part_depth(run: Runner, tokenizer, lines: list[str]) -> None:
    depths = [int(d) for d in run.args.depths.split(",")]
    mem = _total_ram()
    print(f"== depth: Llama-3.2-1B widths, depths {depths}", flush=True)
    rows = []
    for d in depths:
        src = write_llama(run.work / f"llama1b-{d}", d, LLAMA_1B, tokenizer)
        size = folder_bytes(src)
        row = {"depth": d, "size": size}
        for m in ("max", "gptq"):
            row[f"blocks-{m}"] = run.ours(src, m, "blocks", f"{d} blocks, {m}, by block")
        fits = size * 2 * 1.3 < mem  # fp32 whole model and its working copies
        row["whole-max"] = run.ours(src, "max", "whole", f"{d} blocks, max, whole") if fits else None
        row["llmc-max"] = run.llmc(src, "max", f"{d} blocks, QuantizationModifier NVFP4")
        row["llmc-gptq"] = run.llmc(src, "gptq", f"{d} blocks, GPTQModifier NVFP4")
        rows.append(row)
        if not run.args.keep:
            shutil.rmtree(src, ignore_errors=True)
    block_gb = llama_block_bytes(LLAMA_1B) / GIB
    lines += [
        "### Peak memory and time by depth (Llama-3.2-1B widths, bf16 source)",
        "",
        f"Hidden 2048, MLP 8192, 32/8 heads, vocab 128256, random bf16 weights; one block is {block_gb:.2f} GiB in "
        f"bf16 ({2 * block_gb:.2f} GiB in fp32, the CPU compute dtype). Calibrated W4A4 (NVFP4 weights and "
        f"static activation scales), {run.args.calib_samples} x {run.args.seq_len} calibration tokens, "
        "the same for every tool. *by block* = `nvfp4kit quantize --load blocks` (sequential), *whole* = "
        "`--load whole`; llm-compressor: `oneshot(pipeline=\"sequential\")`, model loaded in its bf16.",
        "",
        "| blocks | checkpoint (GiB) | by block max: RSS (MiB) / time (s) | by block gptq: RSS / time | "
        "whole max: RSS / time | llm-compressor RTN: RSS / time | llm-compressor GPTQ: RSS / time | "
        "time vs llmc (max, gptq) | by block, peak RSS while the blocks run (max, gptq) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for k in ("blocks-max", "blocks-gptq", "whole-max", "llmc-max", "llmc-gptq"):
            v = r[k]
            cells.append("-" if v is None else ("fails: " + v["error"].split(":")[0] if "error" in v else
                                                f"{v['peak_rss_mb']:.0f} / {v['wall_s']:.0f}"))
        during = []
        for k in ("blocks-max", "blocks-gptq"):
            marks = _block_marks(r[k].get("marks", [])) if "error" not in r[k] else []
            during.append(f"{max(rss for _, rss in marks):.0f}" if marks else "-")
        ratio = f"{_ratio(r['blocks-max'], r['llmc-max'], 'wall_s')}, {_ratio(r['blocks-gptq'], r['llmc-gptq'], 'wall_s')}"
        lines.append(f"| {r['depth']} | {r['size'] / GIB:.2f} | " + " | ".join(cells) + f" | {ratio} | "
                     f"{', '.join(during)} |")
    ok = [r for r in rows if "error" not in r["blocks-max"]]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        slope = (b["blocks-max"]["peak_rss_mb"] - a["blocks-max"]["peak_rss_mb"]) / (b["depth"] - a["depth"])
        lines += ["", f"Peak RSS of the by-block run grows by {slope:.0f} MiB per added block from {a['depth']} to "
                      f"{b['depth']} blocks (the whole model in bf16 grows by {1024 * block_gb:.0f} MiB per block)."]
    lines.append("")


def part_8b(run: Runner, tokenizer, lines: list[str]) -> None:
    print("== 8b: Llama-3-8B widths, 32 blocks", flush=True)
    src = write_llama(run.work / "llama8b", 32, LLAMA_8B, tokenizer)
    size = folder_bytes(src)
    ours = {m: run.ours(src, m, "blocks", f"8B-shaped, {m}, by block") for m in run.args.methods_8b.split(",")}
    llmc = run.llmc(src, "max", "8B-shaped, QuantizationModifier NVFP4")
    block_gb = llama_block_bytes(LLAMA_8B) / GIB
    lines += [
        "### An 8B-shaped checkpoint on this machine",
        "",
        f"Llama-3-8B widths (hidden 4096, MLP 14336, 32/8 heads, vocab 128256), 32 blocks: {size / GIB:.1f} GiB "
        f"in bf16, {2 * size / GIB:.1f} GiB in fp32 (more than this machine's {_total_ram() / GIB:.0f} GiB of RAM). "
        f"One block: {block_gb:.2f} GiB in bf16. {run.args.calib_samples} x {run.args.seq_len} calibration "
        "tokens, W4A4.",
        "",
        "| run | wall time (s) | peak RSS (MiB) | peak RSS while the blocks run (MiB) | per block (s) | output (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, r in ours.items():
        per = "-" if "error" in r else f"{r['seconds'].get('blocks', 0) / 32:.1f}"
        gib = "-" if "error" in r else f"{r['out_bytes'] / GIB:.2f}"
        marks = _block_marks(r.get("marks", [])) if "error" not in r else []
        during = f"{max(rss for _, rss in marks):.0f}" if marks else "-"
        lines.append(f"| nvfp4kit `--load blocks`, {m} | {_cell(r, 'wall_s', '.0f')} | {_cell(r, 'peak_rss_mb', '.0f')} "
                     f"| {during} | {per} | {gib} |")
    if llmc is not None:
        lines.append(f"| llm-compressor {llmc.get('version', '')} sequential, RTN | {_cell(llmc, 'wall_s', '.0f')} | "
                     f"{_cell(llmc, 'peak_rss_mb', '.0f')} | - | - | - |")
    lines.append("")
    if not run.args.keep:
        shutil.rmtree(src, ignore_errors=True)


def _block_marks(marks: list) -> list[tuple[float, float]]:
    """(seconds, peak RSS MiB) of each block, from the block-progress lines (one per finished block,
    after the line that opens the count)."""
    lines = [m for m in marks if "started" not in m[2]]
    return [(t - t_prev, rss) for (t_prev, _, _), (t, rss, _) in zip(lines, lines[1:])]


def part_super(run: Runner, tokenizer, lines: list[str]) -> None:
    from nvfp4kit.model.presets import SUPER_PATTERN

    pattern = run.args.super_pattern
    print(f"== super: Nemotron 3 Super widths, pattern {pattern} + MTP", flush=True)
    src = write_super(run.work / f"super-{pattern.replace('*', 'A')}", pattern, tokenizer)
    size = folder_bytes(src)
    args = dict(model=str(src), out=str(run.work / "out-ours"), scheme="mixed", recipe="nemotron3-super",
                weight_scale=run.args.super_method, load="blocks", calib_samples=run.args.calib_samples,
                seq_len=run.args.seq_len, device=run.args.device, threads=run.args.threads, overwrite=True,
                smooth=run.args.smooth)
    print("  nvfp4kit Super-shaped, mixed release recipe ...", flush=True)
    r = run_child(sys.executable, OURS, args, run.args.timeout)
    Runner._say("nvfp4kit Super-shaped", r)
    out_bytes = folder_bytes(run.work / "out-ours") if "error" not in r else 0
    shutil.rmtree(run.work / "out-ours", ignore_errors=True)
    lines += [
        "### A Nemotron 3 Super-shaped checkpoint through the release recipe",
        "",
        f"The released widths (hidden 4096; 512 routed experts of 2688 on latent 1024, top-22, shared expert "
        f"5376; Mamba 128 x 64, 8 groups, state 128; attention 32 q / 2 kv heads; vocab 131072; MTP `*E`) with "
        f"the blocks `{pattern}` and the MTP: {size / GIB:.1f} GiB in bf16, random weights. `nvfp4kit quantize "
        f"--scheme mixed --recipe nemotron3-super --weight-scale {run.args.super_method} --load blocks`, "
        f"{run.args.calib_samples} x {run.args.seq_len} calibration tokens.",
        "",
    ]
    if "error" in r:
        lines += [f"The run failed: {r['error']}.", ""]
        return
    per = _block_marks(r["marks"])
    names = {"M": "Mamba", "E": "MoE (512 experts)", "*": "attention"}
    lines += ["| block | type | time (s) | peak RSS during the block (MiB) |", "|---:|---|---:|---:|"]
    by_kind: dict[str, list[float]] = {}
    for i, ((secs, rss), kind) in enumerate(zip(per, pattern)):
        lines.append(f"| {i} | {names[kind]} | {secs:.1f} | {rss:.0f} |")
        by_kind.setdefault(kind, []).append(secs)
    secs = r["seconds"]
    lines.append(f"| - | the rest: MTP (attention + MoE, BF16), final norm, head | {secs.get('rest', 0):.1f} | - |")
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    counts = {k: SUPER_PATTERN.count(k) for k in "ME*"}
    fixed = secs.get("capture", 0) + secs.get("rest", 0) + secs.get("write", 0)
    full = sum(counts[k] * mean.get(k, 0.0) for k in counts) + fixed
    peak = max((rss for _, rss in per), default=r["peak_rss_mb"])
    lines += [
        "",
        f"Whole run: {r['wall_s']:.0f}s (capture {secs.get('capture', 0):.0f}s, blocks {secs.get('blocks', 0):.0f}s, "
        f"rest {secs.get('rest', 0):.0f}s, write {secs.get('write', 0):.0f}s), peak RSS {r['peak_rss_mb']:.0f} MiB, "
        f"output {out_bytes / GIB:.2f} GiB. Extrapolated to the release's 88 blocks ({counts['M']} Mamba, "
        f"{counts['E']} MoE, {counts['*']} attention) at these per-type block times plus the same capture, rest and "
        f"write: {full / 3600:.1f} h on this machine (plus the longer write of the bigger output). Peak memory stays that of the "
        f"largest block (~{peak / 1024:.1f} GiB) plus one output shard, since nothing else grows with depth.",
        "",
    ]
    if not run.args.keep:
        shutil.rmtree(src, ignore_errors=True)


def _real_models(args):
    from nvfp4kit.pipelines.models import embedded_model_path

    models = [("SmolLM2-135M", embedded_model_path())]
    if args.qwen_gguf:
        models.append(("Qwen2.5-Coder-0.5B", Path(args.qwen_gguf)))
    return models


def _hf_folder(gguf: Path, dst: Path):
    """The GGUF model as an fp32 HF folder (llm-compressor reads folders); returns (folder, loaded)."""
    import copy

    from transformers import AutoModelForCausalLM

    from nvfp4kit.pipelines.models import load_source_model

    loaded = load_source_model(gguf)
    if not (dst / "config.json").exists():
        cfg = copy.deepcopy(loaded.model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(loaded.model.state_dict(), strict=False)
        plain.tie_weights()
        plain.save_pretrained(dst)
        loaded.tokenizer.save_pretrained(dst)
        del plain
    return dst, loaded


def part_gptq(run: Runner, lines: list[str]) -> None:
    from nvfp4kit.calibrate import load_text, sample_bos, tokenize
    from nvfp4kit.evaluate import perplexity
    from nvfp4kit.pipelines.models import load_quantized_model

    print("== gptq: end-to-end W4A4 GPTQ on real models", flush=True)
    lines += [
        "### End-to-end W4A4 GPTQ against llm-compressor's GPTQModifier",
        "",
        f"Real models, the same {run.args.calib_samples} x {run.args.seq_len} calibration tokens for both "
        f"tools; perplexity on {run.args.eval_tokens} held-out tokens of the built-in evaluation text, both "
        "checkpoints evaluated with the same W4A4 emulation (NVFP4 weights, activations quantized per 16-block "
        "with the checkpoint's static input scale). Wall time of a complete run in a fresh process (load, "
        "calibrate, quantize, write).",
        "",
        "| model | fp32 ppl | nvfp4kit gptq: ppl / time (s) | llm-compressor GPTQModifier: ppl / time (s) | "
        "time ratio | gap ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, gguf in _real_models(run.args):
        src, loaded = _hf_folder(gguf, run.work / f"hf-{label}")
        run.samples(loaded.tokenizer)
        ids = tokenize(loaded.tokenizer, load_text(None, "eval"))[: run.args.eval_tokens]
        bos = sample_bos(loaded.tokenizer)  # evaluation windows start with BOS when the tokenizer adds one
        fp32 = perplexity(loaded.model, ids, 512, bos_id=bos).ppl
        del loaded
        out = run.work / "out-ours"
        shutil.rmtree(out, ignore_errors=True)
        args = dict(model=str(src), out=str(out), scheme="w4a4", weight_scale="gptq", load="blocks",
                    calib_samples=run.args.calib_samples, seq_len=run.args.seq_len, device=run.args.device,
                    threads=run.args.threads, overwrite=True, format="compressed-tensors", smooth=run.args.smooth)
        print(f"  nvfp4kit {label} gptq ...", flush=True)
        ours = run_child(sys.executable, OURS, args, run.args.timeout)
        Runner._say(f"nvfp4kit {label}", ours)
        p_ours = perplexity(load_quantized_model(out).model, ids, 512, bos_id=bos).ppl if "error" not in ours else math.nan
        peer = run.llmc(src, "gptq", f"{label} GPTQModifier NVFP4")
        p_peer = math.nan
        if peer is not None and "error" not in peer:
            p_peer = perplexity(load_quantized_model(peer["out"]).model, ids, 512, bos_id=bos).ppl
        gap = f"{(p_ours / fp32 - 1) / (p_peer / fp32 - 1):.2f}x" if p_peer == p_peer and p_peer > fp32 else "-"
        lines.append(f"| {label} | {fp32:.3f} | {p_ours:.3f} / {_cell(ours, 'wall_s', '.0f')} | "
                     f"{p_peer:.3f} / {_cell(peer, 'wall_s', '.0f')} | {_ratio(ours, peer, 'wall_s')} | {gap} |")
        print(f"    ppl fp32 {fp32:.3f}, ours {p_ours:.3f}, llm-compressor {p_peer:.3f}", flush=True)
    lines += ["", "Gap ratio: nvfp4kit's perplexity gap to fp32 over llm-compressor's (below 1: closer to fp32).", ""]


def part_head(run: Runner, lines: list[str]) -> None:
    from nvfp4kit.calibrate import calibration_samples
    from nvfp4kit.calibrate.observers import calibrate, stop_after_blocks
    from nvfp4kit.calibrate.records import needed_statistics
    from nvfp4kit.pipelines.models import load_source_model
    from nvfp4kit.policy import plan_precision

    print("== head: calibration with and without the output head", flush=True)
    lines += [
        "### Calibration with and without the output head",
        "",
        f"W4A4 GPTQ statistics (input amax and Hessians of every quantized Linear) over "
        f"{run.args.calib_samples} x {run.args.seq_len} tokens; *with head*: every calibration forward runs "
        "to the logits (as before); *without*: it stops after the last block (`stop_after_blocks`), "
        "nothing else changed. Same statistics either way (the head is not quantized).",
        "",
        "| model | vocabulary | with head (s) | without (s) | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, gguf in _real_models(run.args):
        loaded = load_source_model(gguf)
        model = loaded.model
        samples = calibration_samples(loaded.tokenizer, None, run.args.calib_samples, run.args.seq_len)
        plan = plan_precision(model, "w4a4")
        need = needed_statistics(plan, plan.quantized(), "gptq")

        def once():
            return calibrate(model, plan.quantized(), samples, hessian_for=need.hessian_for)

        t0 = time.perf_counter()
        with_head = once()
        t_with = time.perf_counter() - t0
        t0 = time.perf_counter()
        with stop_after_blocks(model, plan.quantized()):
            without = once()
        t_without = time.perf_counter() - t0
        same = all(with_head[n].input_amax == without[n].input_amax for n in with_head)
        print(f"  {label}: with head {t_with:.1f}s, without {t_without:.1f}s, same amax: {same}", flush=True)
        lines.append(f"| {label} | {model.config.vocab_size} | {t_with:.1f} | {t_without:.1f} | "
                     f"{t_with / t_without:.2f}x |")
        del loaded, model
    lines.append("")


def _total_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="depth,8b,super,gptq,head")
    ap.add_argument("--depths", default="2,4,8,16")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--methods-8b", default="max,gptq")
    ap.add_argument("--super-pattern", default="M*E")
    ap.add_argument("--super-method", default="mse", help="the release's weight-scale rule (weight MSE)")
    ap.add_argument("--qwen-gguf", default=None, help="Qwen2.5-Coder-0.5B GGUF (see shared assets) for the real-model parts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smooth", default="none",
                    help="nvfp4kit's smoothing in these runs (default none: like for like with llm-compressor's "
                         "RTN and GPTQModifier; bench/ptq.py measures what smoothing adds)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--work", default=None, help="folder for the synthetic checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--llmc-python", default=sys.executable)
    ap.add_argument("--skip-llmc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(args, work)
    parts = args.parts.split(",")
    tokenizer = _tokenizer() if {"depth", "8b", "super"} & set(parts) else None
    if tokenizer is not None:
        run.samples(tokenizer)
    device = args.device if args.device != "cpu" else f"CPU ({cpu_model()}, {args.threads} threads)"
    head = [
        "## PTQ at scale (`bench/scale.py`)",
        "",
        "Peak RSS = the quantize process's VmHWM (resident memory including touched pages of memory-mapped "
        "source shards). Each run is a fresh process; times are wall-clock. Each part below records the "
        "device it ran on.",
    ]
    write_results_section(SECTION, "\n".join(head))
    for part in parts:
        t0 = time.perf_counter()
        lines = [f"_Measured {time.strftime('%Y-%m-%d')} on {device}, {_total_ram() / GIB:.0f} GiB RAM, "
                 f"torch {torch.__version__}._", ""]
        {"depth": lambda: part_depth(run, tokenizer, lines), "8b": lambda: part_8b(run, tokenizer, lines),
         "super": lambda: part_super(run, tokenizer, lines), "gptq": lambda: part_gptq(run, lines),
         "head": lambda: part_head(run, lines)}[part]()
        # the heading first, then the device line
        lines = lines[2:3] + [""] + lines[:2] + lines[4:]
        text = "\n".join(lines)
        print("\n" + text + f"\n   ({part}: {time.perf_counter() - t0:.0f}s)", flush=True)
        write_results_section(f"{SECTION}-{part}", text)
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
