"""The device check of the GPU path, in one run: the CUDA test subset, the kernel bandwidth table, training
step times (BF16 vs the nemotron3 recipe vs all-NVFP4) and PTQ calibration throughput, written as the
``gpu-check`` section of ``bench/RESULTS.md`` with the device's name. ``bench/gpu_check.sh`` installs what it
needs and calls this; sized to finish in under 8 minutes on one H100/H200-class GPU.

    python bench/gpu_check.py                  # on a GPU: the real sizes, into bench/RESULTS.md
    python bench/gpu_check.py --dry-run        # any machine: the same steps, tiny sizes, into a temp file

``--dry-run`` runs every step on the CPU with tiny sizes (the Triton kernels in the interpreter) and writes
the section to ``--results`` (default: a file in the system temp folder), never to ``bench/RESULTS.md``: it
proves the script works before a device is spent on it. Exit status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (dry run on CPU)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from results import RESULTS, cpu_model, write_results_section  # noqa: E402

SECTION = "gpu-check"
# the CUDA test subset: every test of the kernels and of the fused training path (compiled on the GPU)
CUDA_TESTS = ["tests/test_kernels_triton.py", "tests/test_training_fused.py"]
DRY_TESTS = ["tests/test_training_fused.py::test_values_gemm_equals_formats_gemm_up_to_reassociation"]

# a GEMM-bound hybrid (hidden 2048, no MoE routing): Mamba, MLP and attention blocks
TRAIN_GPU = dict(preset="small", batch=8, seq=1024, warmup=2, steps=5,
                 overrides=dict(hidden_size=2048, intermediate_size=8192, hybrid_override_pattern="M-*-M-M-",
                                mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
                                num_attention_heads=16, num_key_value_heads=4, head_dim=128, chunk_size=128,
                                num_nextn_predict_layers=0, vocab_size=8192))
TRAIN_DRY = dict(preset="micro", batch=1, seq=32, warmup=1, steps=1,
                 overrides=dict(hidden_size=64, intermediate_size=128, hybrid_override_pattern="M-*-",
                                mamba_num_heads=4, num_nextn_predict_layers=0, vocab_size=64))
RECIPES = ("bf16", "nemotron3", "all-nvfp4")
# Llama-shaped PTQ (hidden 2048, as Llama-3.2-1B's widths), W4A4, block by block on the device
PTQ_GPU = dict(hidden=2048, mlp=8192, heads=32, kv=8, layers=4, samples=64, seq=512)
PTQ_DRY = dict(hidden=64, mlp=128, heads=4, kv=2, layers=2, samples=4, seq=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- steps


def step_tests(dry: bool) -> tuple[str, bool]:
    """The CUDA test subset (on the GPU; a one-test selection in the dry run), in a child pytest."""
    tests = DRY_TESTS if dry else CUDA_TESTS
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300 if not dry else 120)
    last = [ln for ln in res.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    ok = res.returncode == 0
    text = (f"`python {shlex.join(cmd[1:])}`: **{'passed' if ok else 'FAILED'}** in {time.perf_counter() - t0:.0f} s "
            f"({last[0].strip('= ')})")
    if not ok:
        text += "\n\n```\n" + (res.stdout + res.stderr)[-3000:] + "\n```"
    return text, ok


def step_kernels(dry: bool) -> tuple[str, bool]:
    """``bench/kernels.py``'s table: GB/s of each kernel against a device copy (8192x8192 bf16)."""
    import kernels

    if dry:
        def timer(fn, warmup=1, reps=1):
            fn()
            t = time.perf_counter()
            fn()
            return max(time.perf_counter() - t, 1e-9)

        header, rows, where = kernels.run_cuda(64, torch.bfloat16, device="cpu", timer=timer)
        where = "dry run: CPU, Triton interpreter, 64x64 bfloat16 (times are not performance figures)"
    else:
        header, rows, where = kernels.run_cuda(8192, torch.bfloat16)
    ok = all("NO" not in r for r in rows)
    return f"{where}.\n\n" + kernels.table(header, rows), ok


def step_train(dry: bool, device: torch.device) -> tuple[str, bool]:
    """Median training step time (forward, backward, AdamW) of each recipe on one model and batch."""
    from nvfp4kit.kernels.dispatch import raise_if_nonfinite
    from nvfp4kit.model.lm import build_model
    from nvfp4kit.training.loop import TrainConfig, autocast_context, make_optimizer, model_loss
    from nvfp4kit.training.recipes import apply_recipe

    cfg = TRAIN_DRY if dry else TRAIN_GPU
    rows, times, params = [], {}, 0
    for recipe in RECIPES:
        model = build_model(cfg["preset"], seed=0, device=device, **cfg["overrides"])
        params = sum(p.numel() for p in model.parameters())
        apply_recipe(model, recipe, show=False)
        opt = make_optimizer(model, TrainConfig(lr=1e-4))
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=gen).to(device)
        step_times, loss = [], float("nan")
        for i in range(cfg["warmup"] + cfg["steps"]):
            _sync(device)
            t0 = time.perf_counter()
            with autocast_context("auto", device):
                out, _ = model_loss(model, batch)
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= cfg["warmup"]:
                step_times.append(time.perf_counter() - t0)
            loss = float(out.detach())
            raise_if_nonfinite()
        times[recipe] = statistics.median(step_times)
        tokens = cfg["batch"] * cfg["seq"]
        rows.append((recipe, f"{times[recipe] * 1e3:.1f}", f"{tokens / times[recipe]:,.0f}",
                     f"{times[recipe] / times['bf16']:.2f}x", f"{loss:.4f}"))
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ov = cfg["overrides"]
    where = (f"preset `{cfg['preset']}` with hidden {ov['hidden_size']}, MLP {ov['intermediate_size']}, layers "
             f"`{ov['hybrid_override_pattern']}` ({params / 1e6:.0f}M parameters); batch {cfg['batch']} x "
             f"{cfg['seq']} tokens; bf16 autocast where the device has it; median of {cfg['steps']} steps after "
             f"{cfg['warmup']} warm-up")
    header = ("recipe", "step (ms)", "tokens/s", "vs BF16", "last loss")
    return where + ".\n\n" + table(header, rows), all(r[1] != "nan" for r in rows)


def _char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def step_ptq(dry: bool, device: torch.device, work: Path) -> tuple[str, bool]:
    """W4A4 PTQ (``max`` weight scales, calibrated activations) of a random Llama-shaped bf16 checkpoint,
    block by block on the device: calibration tokens per second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    c = PTQ_DRY if dry else PTQ_GPU
    src = work / "llama"
    tok = _char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=c["hidden"], intermediate_size=c["mlp"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv"],
                      max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    text = "".join(chr(32 + int(i)) for i in torch.randint(0, 95, (c["samples"] * c["seq"] * 2,), generator=gen))
    (src / "calib.txt").write_text(text)
    rows = []
    for method in ("max", "gptq"):
        job = QuantizeJob(model=str(src), out=str(work / f"out-{method}"), scheme="w4a4", weight_scale=method,
                          calib=str(src / "calib.txt"), calib_samples=c["samples"], seq_len=c["seq"],
                          load="blocks", device=str(device), overwrite=True)
        result, _ = run_quantize(job)
        s = result.seconds
        compute = s.get("total", 0.0) - s.get("write", 0.0)
        rows.append((method, result.n_calib_tokens, f"{compute:.1f}", f"{result.n_calib_tokens / compute:,.0f}",
                     f"{s.get('total', 0.0):.1f}"))
    where = (f"random Llama-shaped bf16 checkpoint: hidden {c['hidden']}, MLP {c['mlp']}, {c['layers']} blocks, "
             f"{c['heads']}/{c['kv']} heads; W4A4, `--load blocks --device {device}`, {c['samples']} samples x "
             f"{c['seq']} tokens")
    header = ("weight scales", "calibration tokens", "PTQ s (no write)", "tokens/s", "total s (with write)")
    return where + ".\n\n" + table(header, rows), True


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes, into a temp file")
    ap.add_argument("--results", default=None, help="file to write the section to (default: bench/RESULTS.md; "
                                                     "with --dry-run a temp file)")
    ap.add_argument("--steps", default="tests,kernels,train,ptq", help="comma-separated subset of the steps")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - {"tests", "kernels", "train", "ptq"})
    if unknown:
        ap.error(f"--steps: unknown step(s) {', '.join(unknown)}; choose from tests, kernels, train, ptq")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here (torch %s, CUDA %s); use --dry-run on a machine without a GPU"
                 % (torch.__version__, torch.version.cuda))
    if args.results:
        results = Path(args.results)
    elif args.dry_run:
        results = Path(tempfile.gettempdir()) / f"nvfp4kit-gpu-check-dry-run-{os.getpid()}.md"
    else:
        results = RESULTS
    if args.dry_run and results.resolve() == RESULTS.resolve():
        ap.error("--dry-run never writes bench/RESULTS.md; give another --results file")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        import triton

        name = f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))})"
        env = f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}"
    else:
        name = f"dry run on the CPU: {cpu_model()}"
        env = f"torch {torch.__version__}, Triton interpreter; tiny sizes: not performance figures"
    parts = [f"## GPU check (`bench/gpu_check.sh`)\n\nDevice: **{name}**; {env}; {platform.python_version()}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."]
    ok_all = True
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nvfp4kit-gpu-check-") as tmp:
        for step in steps:
            t0 = time.perf_counter()
            print(f"[gpu-check] {step} ...", flush=True)
            try:
                if step == "tests":
                    text, ok = step_tests(args.dry_run)
                elif step == "kernels":
                    text, ok = step_kernels(args.dry_run)
                elif step == "train":
                    text, ok = step_train(args.dry_run, device)
                else:
                    text, ok = step_ptq(args.dry_run, device, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a failed step is reported, the others still run
                text, ok = f"FAILED: {type(e).__name__}: {e}\n\n```\n{traceback.format_exc()[-2500:]}\n```", False
            ok_all &= ok
            title = {"tests": "CUDA tests", "kernels": "Kernels vs device copy", "train": "Training step",
                     "ptq": "PTQ calibration"}[step]
            parts.append(f"### {title} ({time.perf_counter() - t0:.0f} s)\n\n{text}")
            print(f"[gpu-check] {step}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    parts.append(f"Total {time.perf_counter() - t_start:.0f} s; {'every step passed' if ok_all else 'a step FAILED'}.")
    body = "\n\n".join(parts)
    print(body)
    write_results_section(SECTION, body, results)
    print(f"[gpu-check] wrote section {SECTION!r} of {results}", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
