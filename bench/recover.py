"""Recovering the W4A4 PTQ gap: QAT, QAD and mixed precision on SmolLM2-135M and real text.

Perplexity on held-out text (the evaluation split of the built-in corpus, the Python reference
manual's prose, disjoint from the training/calibration split) of:

* fp32: the model as loaded (the GGUF's dequantized weights);
* PTQ W4A4: NVFP4 weights (max block scales) and NVFP4 activations with static, max-calibrated
  global scales; lm_head and embeddings stay in full precision;
* QAT: PTQ W4A4 plus ``--steps`` AdamW steps of next-token loss through the fake quantizer;
* QAD: the same steps and tokens, loss = KL to the frozen fp32 model's logits;
* mixed precision at 4.5 / 4.75 / 5.5 effective bits per weight (NVFP4 W4A4, FP8 W8A8 or BF16 per
  Linear, chosen by Fisher sensitivities on the calibration text; 4.5 bits is pure NVFP4).

"Gap recovered" is ``(ppl_PTQ - ppl_X) / (ppl_PTQ - ppl_fp32)``. Writes its section of
``bench/RESULTS.md`` (the run's token budget and timings included). Run: ``python bench/recover.py``.
Peer libraries are not run: modelopt's QAT fake-quant forward needs CUDA, and torchao / llmcompressor
offer no NVFP4 W4A4 QAT on CPU.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

from nvfp4kit.calibrate.data import builtin_text, tokenize
from nvfp4kit.calibrate.mixed import search_mixed_precision, estimate_sensitivity
from nvfp4kit.calibrate.qat import calibrate_input_amax, frozen_teacher, prepare_qat, set_formats
from nvfp4kit.evaluate.perplexity import perplexity
from nvfp4kit.pipelines.models import load_causal_lm
from nvfp4kit.pipelines.qat import QATJob, train_qat, training_windows
from results import write_results_section  # noqa: E402

SECTION = "recover"
RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=32, help="QAT/QAD optimizer steps")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-qat", type=float, default=3e-5)
    ap.add_argument("--lr-qad", type=float, default=3e-5)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--sens-windows", type=int, default=2, help="windows for the mixed-precision sensitivities")
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5, 4.75, 5.5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    L = args.seq_len

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_causal_lm(None)
    train_ids = tokenize(tok, builtin_text("calib"))
    eval_ids = tokenize(tok, builtin_text("eval"))
    timings["load+tokenize"] = time.perf_counter() - t0
    print(f"load+tokenize: {timings['load+tokenize']:.0f}s", flush=True)
    n_eval = min(args.eval_windows, eval_ids.numel() // L)
    eval_w = eval_ids[: n_eval * L].reshape(n_eval, L)
    calib = [train_ids[i * L:(i + 1) * L].unsqueeze(0) for i in range(args.calib_windows)]
    # training windows: the part of the training split after the calibration windows
    train_windows = training_windows(train_ids[args.calib_windows * L:], L)
    rows: list[tuple[str, float, str]] = []

    def evaluate(label: str, m, note: str = "") -> float:
        t0 = time.perf_counter()
        loss = perplexity(m, eval_w.reshape(-1), L, desc=f"eval {label}").nll
        timings[f"eval {label}"] = time.perf_counter() - t0
        rows.append((label, loss, note))
        print(f"{label:<28} loss {loss:.4f}  ppl {math.exp(loss):8.3f}  ({time.perf_counter() - t_all:.0f}s)",
              flush=True)
        return loss

    def report(partial: bool) -> None:
        fp32_loss = rows[0][1]
        ptq = [r[1] for r in rows if r[0].startswith("PTQ")]
        gap = math.exp(ptq[0]) - math.exp(fp32_loss) if ptq else 0.0
        tokens = args.steps * args.batch_size * L
        lines = [
            "## Recovering the W4A4 PTQ gap (`bench/recover.py`)",
            "",
            f"SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF), held-out text: {n_eval} x {L} tokens of the built-in "
            f"corpus's evaluation split. Calibration: {len(calib)} x {L} tokens; QAT and QAD: {args.steps} steps x "
            f"{args.batch_size} x {L} = **{tokens} training tokens** each (AdamW on the fake-quantized Linears' "
            f"weights, warm-up then cosine to 10%), from the training split. Mixed-precision sensitivities: diagonal "
            f"Fisher on {min(args.sens_windows, len(calib))} x {L} tokens; formats NVFP4 W4A4 / FP8 W8A8 / BF16 per "
            "Linear (fused q/k/v and gate/up share one). lm_head and embeddings in full precision everywhere.",
            "",
            "| model | ppl | loss | gap recovered | notes |",
            "|---|---:|---:|---:|---|",
        ]
        for label, loss, note in rows:
            ppl = math.exp(loss)
            rec = "-" if label == "fp32" or gap <= 0 else f"{(math.exp(ptq[0]) - ppl) / gap:.0%}"
            lines.append(f"| {label} | {ppl:.3f} | {loss:.4f} | {rec} | {note} |")
        lines += [
            "",
            "Gap recovered = (ppl_PTQ - ppl) / (ppl_PTQ - ppl_fp32). QAT trains with the next-token loss on text of "
            "the same domain as the evaluation text, so part of its gain is domain adaptation; QAD only pulls the "
            "quantized model towards the fp32 model's distribution. The evaluation uses "
            f"{n_eval * L} tokens: differences of a few percent of the gap are within noise.",
            "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
            + f"; total {time.perf_counter() - t_all:.0f}.",
            f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, Python "
            f"{sys.version.split()[0]} (shared with other jobs while measured: timings are indicative only).",
            "No peer library row: modelopt's QAT fake-quant forward is CUDA-only, and torchao / llmcompressor have "
            "no NVFP4 W4A4 QAT path on CPU.",
        ]
        if partial:
            lines.insert(2, "*(run in progress: rows so far)*")
            lines.insert(3, "")
        body = "\n".join(lines)
        if not partial:
            print(body)
        if not args.no_write:
            write_results_section(SECTION, body)

    evaluate("fp32", model)
    teacher = frozen_teacher(model)

    # mixed precision: sensitivities once, then one plan per budget
    t0 = time.perf_counter()
    sens = estimate_sensitivity(model, calib[: args.sens_windows], method="fisher")
    timings["sensitivity (fisher)"] = time.perf_counter() - t0
    print(f"sensitivities: {timings['sensitivity (fisher)']:.0f}s", flush=True)
    plans = {b: search_mixed_precision(model, None, b, sensitivity=sens) for b in args.budgets}

    # PTQ W4A4 (max scales, max-calibrated static activation amax); the same module set serves mixed plans
    t0 = time.perf_counter()
    mods = prepare_qat(model, "nvfp4", quantize_input=True)
    calibrate_input_amax(model, calib)
    timings["calibrate"] = time.perf_counter() - t0
    ptq_loss = evaluate("PTQ W4A4 (nvfp4, max)", model)
    for b, plan in plans.items():
        c = plan.counts()
        note = f"{plan.effective_bits:.3f} bits; " + ", ".join(f"{c.get(f, 0)} {f}" for f in ("nvfp4", "fp8", "bf16"))
        if set(plan.formats.values()) == {"nvfp4"}:  # the very PTQ model: no need to run it again
            rows.append((f"mixed {b:g} bits", ptq_loss, note + " (= PTQ W4A4)"))
            continue
        set_formats(model, plan.formats)
        evaluate(f"mixed {b:g} bits", model, note)
        report(partial=True)
    set_formats(model, {n: "nvfp4" for n in mods})
    ptq_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(ptq_state[n])

    tokens = args.steps * args.batch_size * L
    for label, distill, lr in (("QAD", True, args.lr_qad), ("QAT", False, args.lr_qat)):
        restore()
        job = QATJob(steps=args.steps, distill=distill, lr=lr, warmup=max(2, args.steps // 8),
                     batch_size=args.batch_size, seq_len=L, seed=0)
        t0 = time.perf_counter()
        res = train_qat(model, train_windows, job, teacher if distill else None)
        timings[f"train {label}"] = time.perf_counter() - t0
        print(f"{label}: {args.steps} steps in {timings[f'train {label}']:.0f}s", flush=True)
        evaluate(f"{label} W4A4", model, f"{tokens} tokens, lr {lr:g}, train loss {res.loss_first:.4f} -> "
                 f"{res.loss_last:.4f}")
        report(partial=True)
    report(partial=False)


if __name__ == "__main__":
    main()
