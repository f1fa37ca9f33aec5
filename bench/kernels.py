"""Benchmark of the Triton NVFP4 kernels (``nvfp4kit/kernels/triton_nvfp4.py``).

On CUDA: GB/s of every kernel against a device-to-device copy measured in the same run, the share of
copy bandwidth, and the speed-up over the torch reference (and torchao's NVFP4 quantize when it
imports). On CPU: a small smoke check under the Triton interpreter (bit-exactness and that every
kernel launches); interpreter timings are not performance figures.

    python bench/kernels.py                 # 8192 x 8192 bf16 on CUDA, the smoke check on CPU
    python bench/kernels.py --size 4096 --dtype float32

Prints a table and writes the ``kernels`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from nvfp4kit.formats import gemm as ref_gemm  # noqa: E402
from nvfp4kit.formats import mx as ref_mx  # noqa: E402
from nvfp4kit.formats import nvfp4 as ref  # noqa: E402
from nvfp4kit.formats.hadamard import rht_butterfly  # noqa: E402
from nvfp4kit.kernels import triton_nvfp4 as tk  # noqa: E402
from results import write_results_section  # noqa: E402

SECTION = "kernels"
RESULTS = Path(__file__).with_name("RESULTS.md")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bench_cuda(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median seconds of ``fn`` with CUDA events (L2 flushed by a large write between runs)."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def bench_cpu(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def parts_equal(a: ref.NVFP4Parts, b: ref.NVFP4Parts) -> bool:
    return (torch.equal(a.packed, b.packed)
            and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
            and torch.equal(a.global_decode_scale, b.global_decode_scale))


def cases(x: torch.Tensor):
    """(name, bytes moved, triton fn, torch reference fn or None, exactness check or None)."""
    n = x.numel()
    s = x.element_size()
    q_out = n // 2 + n // 16  # packed + E4M3 block scales
    amax = x.float().abs().amax()
    x3 = x.reshape(1, *x.shape)
    seeds = torch.zeros(2, dtype=torch.int64, device=x.device)
    parts = ref.quantize_parts(x, global_amax=amax)
    w = ref.quantize_parts(x, (16, 16), global_amax=amax)

    def launch(**kw):
        return lambda: tk._launch_quantize(x3, col_amax=amax, seeds=seeds, rng_range=ref.NVFP4_RANGE,
                                           row_amax=amax, **kw)

    out = [
        ("global amax (two-phase)", n * s, lambda: tk._run_amax(x3), lambda: x.float().abs().amax(),
         lambda: torch.equal(tk.global_amax(x), amax)),
        ("quantize 1x16, amax given (fused kernel)", n * s + q_out,
         launch(row=True, col=False, two_d=False, stochastic=False),
         lambda: ref.quantize_parts(x, global_amax=amax),
         lambda: parts_equal(tk.quantize_parts(x, global_amax=amax), parts)),
        ("quantize 1x16, full (amax + quantize + check)", 2 * n * s + q_out, lambda: tk.quantize_parts(x),
         lambda: ref.quantize_parts(x), lambda: parts_equal(tk.quantize_parts(x), ref.quantize_parts(x))),
        ("quantize 16x16 (weights), amax given", n * s + q_out,
         launch(row=True, col=False, two_d=True, stochastic=False),
         lambda: ref.quantize_parts(x, (16, 16), global_amax=amax),
         lambda: parts_equal(tk.quantize_parts(x, block=(16, 16), global_amax=amax), w)),
        ("quantize 1x16 stochastic, amax given", n * s + q_out,
         launch(row=True, col=False, two_d=False, stochastic=True),
         lambda: ref.quantize_parts(x, rounding="stochastic", global_amax=amax), None),
        ("rowwise + columnwise (x and x^T), amax given", n * s + 2 * q_out,
         launch(row=True, col=True, two_d=False, stochastic=False),
         lambda: (ref.quantize_parts(x, global_amax=amax), ref.quantize_parts(x.t(), global_amax=amax)),
         lambda: all(parts_equal(a, b) for a, b in zip(
             tk.quantize_rowwise_columnwise(x, global_amax=amax),
             (parts, ref.quantize_parts(x.t(), global_amax=amax))))),
        ("RHT + quantize 1x16, amax given", n * s + q_out,
         launch(row=True, col=False, two_d=False, stochastic=False, row_rht=True, sign_mask=tk._sign_mask(None)),
         lambda: ref.quantize_parts(rht_butterfly(x), global_amax=amax),
         lambda: parts_equal(tk.rht_quantize(x, global_amax=amax),
                             ref.quantize_parts(rht_butterfly(x), global_amax=amax))),
        ("dequantize -> input dtype", q_out + n * s, lambda: tk.dequantize(parts, x.dtype),
         lambda: ref.dequantize_parts(parts.packed, parts.block_scale, parts.global_decode_scale, x.dtype),
         lambda: torch.equal(tk.dequantize(parts, x.dtype),
                             ref.dequantize_parts(parts.packed, parts.block_scale, parts.global_decode_scale,
                                                  x.dtype))),
        ("MXFP8 quantize (E8M0 / 32)", n * s + n + n // 32, lambda: tk.mxfp8_quantize(x),
         lambda: ref_mx.mxfp8_quantize(x),
         lambda: torch.equal(tk.mxfp8_quantize(x).data.view(torch.uint8),
                             ref_mx.mxfp8_quantize(x).data.view(torch.uint8))),
    ]
    return out


def peer_torchao(x: torch.Tensor):
    """torchao's NVFP4 quantize (eager), if it imports: (name, fn) or None."""
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize
    except Exception:  # noqa: BLE001 - a peer that does not import is simply left out
        return None
    pts = (x.float().abs().amax() / 2688.0).reshape(1)
    return "torchao nvfp4_quantize (eager)", lambda: nvfp4_quantize(x, 16, pts)


def run_cuda(size: int, dtype: torch.dtype, device: str = "cuda", timer=None):
    """The GPU table. ``device``/``timer`` exist so the same code can be exercised on CPU."""
    bench_cuda = timer or globals()["bench_cuda"]
    x = torch.randn(size, size, device=device, dtype=dtype)
    y = torch.empty_like(x)
    t_copy = bench_cuda(lambda: y.copy_(x))
    copy_gbs = 2 * x.numel() * x.element_size() / t_copy / 1e9
    rows = [("device-to-device copy", f"{t_copy * 1e6:.1f}", f"{copy_gbs:.0f}", "100%", "", "", "")]
    for name, nbytes, fn, ref_fn, check in cases(x):
        t = bench_cuda(fn)
        t_ref = bench_cuda(ref_fn, warmup=1, reps=5) if ref_fn else float("nan")
        gbs = nbytes / t / 1e9
        exact = "" if check is None else ("yes" if check() else "NO")
        rows.append((name, f"{t * 1e6:.1f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%",
                     f"{t_ref * 1e6:.1f}", f"{t_ref / t:.1f}x", exact))
    peer = peer_torchao(x)
    if peer is not None:
        try:
            t_peer = bench_cuda(peer[1], warmup=2, reps=10)
            t_ours = bench_cuda(lambda: tk.quantize_parts(x))
            rows.append((f"peer: {peer[0]}", f"{t_peer * 1e6:.1f}", "", "", "", f"{t_peer / t_ours:.1f}x (peer time / ours)",
                         ""))
        except Exception as e:  # noqa: BLE001
            rows.append((f"peer: {peer[0]}", "failed", type(e).__name__, "", "", "", ""))
    # emulated GEMM: compute-bound, reported in TFLOP/s against the torch emulation
    m = min(size, 4096)
    a = ref.quantize_parts(torch.randn(m, m, device=device))
    b = ref.quantize_parts(torch.randn(m, m, device=device), (16, 16))
    t = bench_cuda(lambda: tk.nvfp4_gemm(a, b, torch.bfloat16, tile=(128, 128, 64)))
    t_ref = bench_cuda(lambda: ref_gemm.nvfp4_gemm(a, b, torch.bfloat16), warmup=1, reps=5)
    rows.append((f"emulated NVFP4 GEMM {m}^3 -> bf16", f"{t * 1e6:.1f}", f"{2 * m**3 / t / 1e12:.1f} TFLOP/s", "",
                 f"{t_ref * 1e6:.1f}", f"{t_ref / t:.1f}x", ""))
    header = ("kernel", "time (us)", "GB/s", "% of copy", "torch ref (us)", "speed-up vs torch", "bit-exact")
    dev = torch.cuda.get_device_name() if device == "cuda" else device
    return header, rows, f"CUDA, {dev}, {size}x{size} {str(dtype).replace('torch.', '')}"


def run_cpu_smoke(dtype: torch.dtype):
    x = torch.randn(64, 256, dtype=dtype)
    rows = []
    for name, _nbytes, fn, _ref_fn, check in cases(x):
        if check is None:  # stochastic: reproducible per seed instead
            g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
            ok = parts_equal(tk.quantize_parts(x, rounding="stochastic", generator=g1),
                             tk.quantize_parts(x, rounding="stochastic", generator=g2))
        else:
            ok = check()
        t = bench_cpu(fn, reps=1)
        rows.append((name, "yes" if ok else "NO", f"{t * 1e3:.0f}"))
    a = ref.quantize_parts(torch.randn(64, 256))
    b = ref.quantize_parts(torch.randn(32, 256), (16, 16))
    got, want = tk.nvfp4_gemm(a, b), ref_gemm.nvfp4_gemm(a, b)
    close = torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    rows.append(("emulated NVFP4 GEMM 64x32x256", "close" if close else "NO", ""))
    header = ("kernel", "matches the torch reference", "interpreter ms (not a perf figure)")
    return header, rows, f"CPU ({platform.processor() or platform.machine()}), Triton interpreter smoke, 64x256"


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="square input size on CUDA (default 8192)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if torch.cuda.is_available():
        header, rows, where = run_cuda(args.size, dtype)
    else:
        header, rows, where = run_cpu_smoke(dtype)
    text = (f"## Triton kernels (`bench/kernels.py`)\n\n{where}; torch {torch.__version__}.\n"
            f"GB/s counts the bytes each kernel must move (see bench/NOTES.md); copy counts read + write.\n\n"
            + table(header, rows))
    print(text)
    if not args.no_write:
        write_results_section(SECTION, text)
    return 0 if all("NO" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
