"""Per-layer report of a quantized model: format, shape, scale statistics, error against a reference,
and a PNG chart of the per-layer error (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.layout import dequantize_linear
from ..checkpoint.types import QuantizedModel


@dataclass
class LayerRow:
    name: str
    format: str
    shape: tuple[int, int]
    global_scale: float | None  # decode direction (NVFP4: amax/2688, FP8: amax/448)
    block_scale_min: float | None  # smallest non-zero E4M3 block scale
    block_scale_mean: float | None
    block_scale_max: float | None
    input_amax: float | None
    rel_error: float | None  # ||W_hat - W|| / ||W|| against the reference, when one is given


def layer_rows(qmodel: QuantizedModel, reference: dict[str, torch.Tensor] | None = None) -> list[LayerRow]:
    """One row per quantized Linear; ``reference`` maps module names (or ``name.weight``) to weights."""
    rows = []
    for name, q in qmodel.linears.items():
        gs = bmin = bmean = bmax = None
        if q.format == "nvfp4":
            gs = float(q.nvfp4.global_decode_scale)
            bs = q.nvfp4.block_scale.float()
            nz = bs[bs > 0]
            bmin = float(nz.min()) if nz.numel() else 0.0
            bmean = float(bs.mean()) if bs.numel() else 0.0
            bmax = float(bs.max()) if bs.numel() else 0.0
        elif q.format == "fp8":
            gs = float(q.fp8_weight_scale)
        err = None
        if reference is not None:
            ref = reference.get(name, reference.get(f"{name}.weight"))
            if ref is not None:
                if tuple(ref.shape) != tuple(q.shape):
                    raise ValueError(f"{name}: reference weight shape {tuple(ref.shape)} != quantized {tuple(q.shape)}")
                r = ref.detach().double()
                denom = float(r.norm())
                diff = float((dequantize_linear(q, torch.float64) - r).norm())
                err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        rows.append(LayerRow(name, q.format, tuple(q.shape), gs, bmin, bmean, bmax, q.input_amax, err))
    return rows


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plot_layer_errors(rows: list[LayerRow], path: str | Path, title: str = "per-layer relative weight error") -> Path:
    """Bar chart of ``rel_error`` per layer (colour by format) written as PNG."""
    from ..optional import require

    require("matplotlib", "drawing charts (--plot)").use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    pts = sorted((r for r in rows if r.rel_error is not None), key=lambda r: natural_key(r.name))
    if not pts:
        raise ValueError("no layer has a reference error to plot (pass --against SOURCE)")
    colors = {"nvfp4": "tab:green", "fp8": "tab:blue", "bf16": "tab:gray"}
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.08 * len(pts) + 2)), 4.0), dpi=100)
    ax.bar(range(len(pts)), [r.rel_error for r in pts], color=[colors.get(r.format, "tab:red") for r in pts])
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("||W_q - W|| / ||W||")
    ax.set_title(title)
    step = max(1, len(pts) // 20)
    ax.set_xticks(range(0, len(pts), step))
    ax.set_xticklabels([pts[i].name.replace("model.layers.", "L") for i in range(0, len(pts), step)],
                       rotation=70, fontsize=6, ha="right")
    ax.legend(handles=[Patch(color=c, label=f) for f, c in colors.items() if any(r.format == f for r in pts)])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
