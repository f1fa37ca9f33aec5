"""Nemotron 3 hybrid model on CPU: forward / training-step / decode throughput of a small preset,
and the cost of `nvfp4kit model info` for the Super preset (meta device).

    python bench/model.py                    # tiny preset, writes the 'model' section of bench/RESULTS.md
    python bench/model.py --preset small --threads 2 --no-write

Peer in the same run: transformers' NemotronHForCausalLM on the same config and weights (loaded
from our checkpoint directory), pure-torch path; ratios are ours / theirs in tokens/s.
For `model info`, the peer is building transformers' model for the same config on the meta device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from results import cpu_model, timeit, write_results_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "model"


def machine() -> str:
    model = cpu_model()
    load = ", load average %.1f/%.1f/%.1f at the end" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    import transformers

    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}{load}")


def hf_model(path):
    from transformers import NemotronHForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NemotronHForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()


def throughput_rows(preset: str, batch: int, seq: int, warmup: int, repeats: int):
    from nvfp4kit.model import build_model, save_pretrained

    m = build_model(preset, seed=0)
    cfg = m.config
    n_params = sum(p.numel() for p in m.parameters())
    tmp = tempfile.mkdtemp(prefix="nvfp4kit-bench-")
    save_pretrained(m, Path(tmp) / "ck")
    hf = hf_model(Path(tmp) / "ck")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    tokens = batch * seq
    rows = []

    def fwd(model):
        def run():
            with torch.no_grad():
                model(ids)
        return run

    m.eval()
    t_ours = timeit(fwd(m), warmup, repeats)
    t_hf = timeit(fwd(hf), warmup, repeats)
    rows.append(["forward (no grad)", f"{tokens / t_ours:,.0f}", f"{tokens / t_hf:,.0f}", f"{t_hf / t_ours:.2f}x"])

    def train_step(model, ours: bool, mtp: bool):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def run():
            if ours:
                out = model(ids, labels=ids, mtp_depths=None if mtp else 0)
            else:
                out = model(ids, labels=ids)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return run

    t_ours0 = timeit(train_step(m, True, False), warmup, repeats)
    t_hf_tr = timeit(train_step(hf, False, False), warmup, repeats)
    rows.append(["train step, main loss (fwd+bwd+AdamW)", f"{tokens / t_ours0:,.0f}", f"{tokens / t_hf_tr:,.0f}",
                 f"{t_hf_tr / t_ours0:.2f}x"])
    t_ours_mtp = timeit(train_step(m, True, True), warmup, repeats)
    rows.append([f"train step, main + {cfg.mtp_depths} MTP depths", f"{tokens / t_ours_mtp:,.0f}", "n/a (no MTP)",
                 ""])

    m.eval()
    hf.eval()
    prompt = ids[:1, :32]
    new = 64

    def gen_ours():
        m.generate(prompt, new)

    def gen_hf():
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    t_g = timeit(gen_ours, 1, max(1, repeats // 2))
    t_gh = timeit(gen_hf, 1, max(1, repeats // 2))
    rows.append(["greedy decode, batch 1 (32-token prompt)", f"{new / t_g:,.0f}", f"{new / t_gh:,.0f}",
                 f"{t_gh / t_g:.2f}x"])
    out, stats = m.speculative_generate(prompt, new, num_draft=cfg.mtp_depths)
    t_s = timeit(lambda: m.speculative_generate(prompt, new, num_draft=cfg.mtp_depths), 0, max(1, repeats // 2))
    same = torch.equal(out, m.generate(prompt, new))
    rows.append([f"MTP speculative decode ({cfg.mtp_depths} drafts, random weights: acceptance "
                 f"{stats.acceptance:.0%}, output == greedy: {'yes' if same else 'NO'})", f"{new / t_s:,.0f}", "", ""])
    return rows, n_params, cfg


def speculative_rows(preset: str, steps: int, repeats: int):
    """Train briefly on a real text (bytes of the Python reference manual) so the MTP head has
    something to predict, then compare greedy decode with MTP self-speculative decode."""
    from pydoc_data.topics import topics

    from nvfp4kit.model import build_model

    text = "".join(topics[k] for k in sorted(topics))[:20000].encode()
    data = torch.tensor(list(text))
    m = build_model(preset, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    m.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 257, (8,), generator=g)
        batch = torch.stack([data[s:s + 256] for s in starts])
        out = m(batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    m.eval()
    rows = []
    new = 96
    prompts = [data[s:s + 64][None] for s in (1000, 7000, 13000)]
    t_g = sum(timeit(lambda p=p: m.generate(p, new), 0, repeats) for p in prompts)
    acc, same = [], True
    for p in prompts:
        out, st = m.speculative_generate(p, new, num_draft=m.config.mtp_depths)
        acc.append(st)
        same &= torch.equal(out, m.generate(p, new))
    t_s = sum(timeit(lambda p=p: m.speculative_generate(p, new, num_draft=m.config.mtp_depths), 0, repeats)
              for p in prompts)
    drafted = sum(s.drafted for s in acc)
    accepted = sum(s.accepted for s in acc)
    tpr = sum(s.accepted + s.rounds for s in acc) / sum(s.rounds for s in acc)
    rows.append([f"greedy decode ({len(prompts)} prompts x {new} tokens)", f"{len(prompts) * new / t_g:,.0f}", "", ""])
    rows.append([f"MTP speculative ({m.config.mtp_depths} drafts): acceptance {accepted / drafted:.0%}, "
                 f"{tpr:.2f} tokens per main forward, output == greedy: {'yes' if same else 'NO'}",
                 f"{len(prompts) * new / t_s:,.0f}", "", f"{t_g / t_s:.2f}x vs greedy"])
    return rows, train_s, None


INFO_SNIPPET = r"""
import sys, time
t = time.perf_counter()
{body}
elapsed = time.perf_counter() - t
# VmHWM: peak resident set of this process image (ru_maxrss would include the parent's before exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", elapsed, int(hwm) / 1024)
"""

OURS = """
from nvfp4kit.model.params import count_parameters
from nvfp4kit.model.presets import get_preset
c = count_parameters(get_preset("{preset}"))
print("COUNT", c.total, c.active)
"""

THEIRS = """
import torch, warnings
warnings.simplefilter("ignore")
from transformers import NemotronHConfig, NemotronHForCausalLM
from nvfp4kit.model.presets import get_preset
d = get_preset("{preset}").to_dict()
d.pop("architectures"); d.pop("model_type")
cfg = NemotronHConfig(**{{k: v for k, v in d.items() if k not in ("mtp_depths", "mtp_loss_scale")}})
with torch.device("meta"):
    m = NemotronHForCausalLM(cfg)
print("COUNT", sum(p.numel() for p in m.parameters()), 0)
"""


def run_snippet(body: str):
    code = INFO_SNIPPET.format(body=body)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t
    res = [ln.split() for ln in out.splitlines() if ln.startswith(("RESULT", "COUNT"))]
    d = {r[0]: r[1:] for r in res}
    return wall, float(d["RESULT"][0]), float(d["RESULT"][1]), int(d["COUNT"][0]), int(d["COUNT"][1])


def info_rows(preset: str):
    rows = []
    wall, build, rss, total, active = run_snippet(OURS.format(preset=preset))
    t = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "nvfp4kit.cli", "model", "info", "--preset", preset],
                         capture_output=True, text=True)
    cli_wall = time.perf_counter() - t
    rows.append(["nvfp4kit count_parameters (meta)", f"{build:.2f}", f"{wall:.2f}", f"{rss:,.0f}",
                 f"{total / 1e9:.2f}B / {active / 1e9:.2f}B"])
    rows.append(["`nvfp4kit model info` (whole command)", "", f"{cli_wall:.2f}",
                 "", "ok" if cli.returncode == 0 else f"exit {cli.returncode}"])
    try:
        wall_h, build_h, rss_h, total_h, _ = run_snippet(THEIRS.format(preset=preset))
        rows.append(["transformers NemotronHForCausalLM on meta", f"{build_h:.2f}", f"{wall_h:.2f}",
                     f"{rss_h:,.0f}", f"{total_h / 1e9:.2f}B / n/a"])
        rows.append(["ratio (transformers / nvfp4kit build time)", f"{build_h / build:.2f}x", "", "", ""])
    except subprocess.CalledProcessError as e:
        rows.append(["transformers NemotronHForCausalLM on meta", "failed", "", "", e.stderr.strip()[-80:]])
    return rows


def markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title, columns, rows):
    print(f"\n{title}")
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--info-preset", default="nemotron3-super-120b-a12b")
    p.add_argument("--spec-steps", type=int, default=150, help="training steps before the speculative-decode rows")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, n_params, cfg = throughput_rows(args.preset, args.batch, args.seq, args.warmup, args.repeats)
    cols = ["workload", "nvfp4kit tokens/s", "transformers tokens/s", "nvfp4kit / transformers"]
    title = (f"preset '{args.preset}' ({n_params / 1e6:.1f}M parameters, pattern {cfg.hybrid_override_pattern}, "
             f"MTP {cfg.num_nextn_predict_layers}), batch {args.batch} x {args.seq} tokens, fp32")
    print_table(title, cols, rows)
    srows, train_s, _ = speculative_rows(args.preset, args.spec_steps, max(1, args.repeats // 2))
    stitle = (f"decode after {args.spec_steps} training steps (8 x 256 bytes of the Python reference manual, "
              f"{train_s:.0f} s)")
    print_table(stitle, cols, srows)
    icols = ["what", "build s", "process wall s", "peak RSS MiB", "total / active params"]
    irows = info_rows(args.info_preset)
    print_table(f"model info --preset {args.info_preset}", icols, irows)
    if not args.no_write:
        body = [
            "## Nemotron 3 hybrid model on CPU (`bench/model.py`)",
            "",
            f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
            f"Median of {args.repeats} runs. {title}. transformers runs its pure-torch path on the same weights "
            "(loaded from our checkpoint directory); its training step has no MTP loss.",
            "",
            markdown(cols, rows),
            "",
            f"Self-speculative decoding, {stitle}; batch 1, greedy:",
            "",
            markdown(cols, srows),
            "",
            f"`model info` for `{args.info_preset}`: the model is built on the meta device (no weights), in a fresh "
            "process; peak RSS of that process.",
            "",
            markdown(icols, irows),
        ]
        write_results_section(SECTION, "\n".join(body))
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
