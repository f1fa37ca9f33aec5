"""Benchmark: NVFP4 quantize + pack of a bf16 matrix on CPU, nvfp4kit against torchao and modelopt.

    python bench/quantize.py                 # 4096x4096 and 8192x8192, writes bench/RESULTS.md
    python bench/quantize.py --sizes 4096 --repeats 5 --no-write

Measures, in one run and on the same input (median wall time of ``--repeats`` runs after
``--warmup`` runs):

* nvfp4kit default path: ``nvfp4kit.quantize(x)`` (packed codes + E4M3 block scales + global scale,
  backend "auto", the compiled CPU kernel for tensors this size), with all threads and with one;
* nvfp4kit reference path: ``nvfp4kit.quantize(x, backend="torch")``;
* torchao ``NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(amax))``, the amax
  taken in the timed region so it does the same two-level work;
* modelopt ``NVFP4QTensor.quantize(x, 16)`` (computes its per-tensor scale itself);
* ``x.clone()``: reading and writing the tensor once, a memory-bandwidth ceiling.

Ratios are speedups over the faster of the two peers (> 1 is faster). A second table times the
reference and the compiled path over tensor sizes to locate the crossover that the dispatch's
``COMPILED_MIN_NUMEL`` should sit at. Results go to the ``quantize`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

import nvfp4kit
from nvfp4kit.formats.nvfp4 import quantize_parts as reference_parts
from nvfp4kit.kernels import cpu, dispatch
from results import cpu_model, timeit, write_results_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "quantize"



def with_threads(n: int, fn):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def peers():
    """(name, make_fn) of the peer libraries that import here."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

            def torchao_fn(x):
                return lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))

            out.append(("torchao to_nvfp4", torchao_fn))
        except Exception as e:  # noqa: BLE001
            print(f"torchao unavailable: {e}", file=sys.stderr)
        try:
            from modelopt.torch.quantization.qtensor import NVFP4QTensor

            out.append(("modelopt NVFP4QTensor", lambda x: (lambda: NVFP4QTensor.quantize(x, 16))))
        except Exception as e:  # noqa: BLE001
            print(f"modelopt unavailable: {e}", file=sys.stderr)
    return out


def version(mod: str) -> str:
    try:
        from importlib.metadata import version as v

        return v(mod)
    except Exception:  # noqa: BLE001
        return "n/a"


def machine() -> str:
    model = cpu_model()
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.1f/%.1f/%.1f at the end" % os.getloadavg()
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"torchao {version('torchao')}, modelopt {version('nvidia-modelopt')}, Python {platform.python_version()}{load}"
    )


def main_table(sizes, warmup, repeats):
    rows = []
    peer_fns = peers()
    threads = torch.get_num_threads()
    for n in sizes:
        x = torch.randn(n, n, generator=torch.Generator().manual_seed(n)).bfloat16()
        numel = x.numel()
        chosen = dispatch.resolve_backend("auto", x)
        got = nvfp4kit.quantize(x)
        ref = reference_parts(x)
        exact = torch.equal(got.packed, ref.packed) and torch.equal(
            got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8)
        )
        entries = [
            (f"nvfp4kit default ({chosen}, {threads} thr)", lambda: nvfp4kit.quantize(x), warmup, repeats),
            (f"nvfp4kit default ({chosen}, 1 thr)", with_threads(1, lambda: nvfp4kit.quantize(x)), warmup, repeats),
            ("nvfp4kit reference (backend='torch')", lambda: nvfp4kit.quantize(x, backend="torch"), 1, max(3, repeats // 2)),
        ]
        for name, make in peer_fns:
            entries.append((name, make(x), 1, max(3, repeats // 2)))
        entries.append(("x.clone() (bandwidth)", lambda: x.clone(), warmup, repeats))
        timed = [(name, timeit(fn, w, r)) for name, fn, w, r in entries]
        peer_names = {name for name, _ in peer_fns}
        peer_best = min((t for name, t in timed if name in peer_names), default=None)
        for name, t in timed:
            ratio = f"{peer_best / t:.1f}x" if peer_best else "n/a"
            rows.append([f"{n}x{n}", name, f"{t * 1e3:.2f}", f"{numel / t / 1e9:.3f}", ratio])
        rows.append([f"{n}x{n}", f"default == reference bit for bit: {'yes' if exact else 'NO'}", "", "", ""])
    return ["shape", "implementation", "ms", "Gelem/s", "vs faster peer"], rows


def crossover_table(warmup, repeats):
    """Reference vs compiled path (both called through the dispatch) over sizes, bf16, 1x16 blocks."""
    rows = []
    crossover = None
    for log2 in range(4, 23, 2):
        numel = 1 << log2
        k = min(numel, 4096)
        x = torch.randn(numel // k, k, generator=torch.Generator().manual_seed(log2)).bfloat16()
        r = max(5, repeats * (1 << max(0, 16 - log2)) // 4)
        t_ref = timeit(lambda: dispatch.quantize_parts(x, backend="torch"), warmup, min(r, 50))
        t_cmp = timeit(lambda: dispatch.quantize_parts(x, backend="compiled"), warmup, min(r, 200))
        if crossover is None and t_cmp < t_ref:
            crossover = numel
        rows.append([f"2^{log2}", f"{t_ref * 1e3:.3f}", f"{t_cmp * 1e3:.3f}", f"{t_ref / t_cmp:.1f}x"])
    return ["elements", "reference ms", "compiled ms", "compiled speedup"], rows, crossover


def print_table(title, columns, rows):
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        Console().print(t)
    except ImportError:
        print(title)
        for r in [columns, *rows]:
            print("  ".join(str(c) for c in r))


def markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="square matrix sizes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-crossover", action="store_true", help="skip the reference-vs-compiled size sweep")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)

    ok, why = cpu.available(torch.device("cpu"))
    if not ok:
        print(f"compiled CPU backend unavailable ({why}); the default path is the reference", file=sys.stderr)

    columns, rows = main_table(args.sizes, args.warmup, args.repeats)
    print_table("NVFP4 quantize + pack, bf16 on CPU", columns, rows)
    body = [
        "## NVFP4 quantize + pack on CPU (`bench/quantize.py`)",
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
        "Median wall time; bf16 input; output = packed E2M1 codes + E4M3 block scales + FP32 global scale.",
        "Speedup = time of the faster of torchao/modelopt divided by this row's time.",
    ]
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        body.append(
            "The machine was shared (load average above the core count): every time is inflated, the ratios "
            "(all measured in this run) are the comparable figures, and 1- vs 2-thread rows mostly show "
            "how much CPU the other processes left."
        )
    body += ["", markdown(columns, rows)]
    if not args.no_crossover:
        ccols, crows, crossover = crossover_table(args.warmup, args.repeats)
        print_table("reference vs compiled path by size (bf16, 1x16 blocks)", ccols, crows)
        where = f"2^{crossover.bit_length() - 1} elements" if crossover else "not reached"
        print(f"compiled path first faster at {where}; dispatch COMPILED_MIN_NUMEL = {dispatch.COMPILED_MIN_NUMEL}")
        body += [
            "",
            f"Reference vs compiled path by size: the compiled path is faster from {where} on "
            f"(dispatch `COMPILED_MIN_NUMEL` = {dispatch.COMPILED_MIN_NUMEL}).",
            "",
            markdown(ccols, crows),
        ]
    if not args.no_write:
        write_results_section(SECTION, "\n".join(body))
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
