"""What is inside a quantized checkpoint, layer by layer (the job behind ``nvfp4kit inspect``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import progress
from ..evaluate.report import LayerRow, layer_rows, plot_layer_errors
from ..devices import resolve_device
from .models import reference_linear_weights


@dataclass
class InspectResult:
    path: str
    format: str
    rows: list[LayerRow]
    n_tensors: int
    exclude_modules: list[str]
    plot: Path | None = None
    kv_cache_format: str | None = None  # "fp8" for a static FP8 KV cache
    kv_cache_amax: dict[str, tuple[float, float]] | None = None  # attention -> (k_amax, v_amax)


def inspect_checkpoint(path: str | os.PathLike, against: str | os.PathLike | None = None, plot: str | None = None,
                       use_embedded_reference: bool = False, device: str = "cpu") -> InspectResult:
    """Per-layer rows of a quantized checkpoint; with ``against``, the relative weight error per layer
    (the reference loaded on ``device``, compared on the CPU)."""
    from ..checkpoint import detect_format, load_quantized

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inspect: {str(p)!r} does not exist")
    info = detect_format(p)
    with progress.task(f"reading {p.name}", total=1) as t:
        qm = load_quantized(p)
        t.advance(1)
    ref = None
    if against is not None or use_embedded_reference:
        ref = {n: w.cpu() for n, w in reference_linear_weights(against, resolve_device(device)).items()}
    rows = layer_rows(qm, ref)
    plot_path = None
    if plot is not None:
        if ref is None:
            raise ValueError("--plot needs --against SOURCE (the per-layer error is measured against it)")
        plot_path = plot_layer_errors(rows, plot, title=f"{p.name}: relative weight error per layer")
    return InspectResult(str(p), info.format, rows, len(qm.tensors), list(qm.exclude_modules), plot_path,
                         qm.kv_cache_format, dict(qm.kv_cache_amax))
