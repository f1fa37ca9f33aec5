"""What is inside a quantized checkpoint, layer by layer (the job behind ``nvfp4kit inspect``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from ..evaluate.report import LayerRow, layer_rows, plot_layer_errors
from ..devices import resolve_device
from ..optional import require
from .models import HF_MODELS, reference_linear_weights


@dataclass
class InspectResult:
    path: str
    format: str
    rows: list[LayerRow]
    n_tensors: int
    exclude_modules: list[str]
    plot: Path | None = None
    kv_cache_format: str | None = None  # "fp8" / "nvfp4" for a static FP8 / NVFP4 KV cache
    kv_cache_amax: dict[str, tuple[float, float]] | None = None  # attention -> (k_amax, v_amax)
    problems: list[str] = field(default_factory=list)  # broken scales / non-finite values, per tensor


def inspect_checkpoint(path: str | os.PathLike, against: str | os.PathLike | None = None, plot: str | None = None,
                       use_embedded_reference: bool = False, device: str = "cpu") -> InspectResult:
    """Per-layer rows of a quantized checkpoint; with ``against``, the relative weight error per layer
    (the reference loaded on ``device``, compared on the CPU)."""
    from ..checkpoint import detect_format, load_quantized

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inspect: {str(p)!r} does not exist")
    if plot is not None:  # before any work: the optional modules these options need
        require("matplotlib", "drawing --plot charts")
    if against is not None or use_embedded_reference:
        require("transformers", HF_MODELS)
    info = detect_format(p)
    from ..checkpoint import CheckpointError
    from ..checkpoint.health import checkpoint_problems, scale_problems

    with progress.task(f"reading {p.name}", total=1) as t:
        try:
            qm = load_quantized(p)
        except CheckpointError as e:  # unreadable (e.g. a NaN global scale): still list every broken scale
            broken = scale_problems(p)
            if not broken:
                raise
            raise CheckpointError(f"{e}\nbroken values, per tensor:\n" + "\n".join(f"  - {b}" for b in broken)) from None
        problems = checkpoint_problems(p, qm)
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
                         qm.kv_cache_format, dict(qm.kv_cache_amax), problems)
