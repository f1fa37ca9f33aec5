"""Shared by the benchmark scripts: a median timer, and the writer of each script's own section of
``bench/RESULTS.md``.

A section is the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; writing it replaces
only that section (or appends it), through a temporary file renamed into place.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_results_section(section: str, body: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def timeit(fn, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_ptq_peer_arguments(ap) -> None:
    """Options shared by the PTQ benchmarks: weight-scale methods, threads, the llm-compressor interpreter."""
    import os
    import sys

    ap.add_argument("--methods", default="max,mse,4over6,gptq")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--llmc-python", default=sys.executable, help="interpreter with llmcompressor installed")
    ap.add_argument("--skip-llmc", action="store_true")
