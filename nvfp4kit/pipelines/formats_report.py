"""Error of each number format on one tensor: the numbers behind ``nvfp4kit formats``."""

from __future__ import annotations

import math

import torch

from ..api import quantize
from ..formats.hadamard import rht
from ..formats.mx import mx_dequantize, mx_quantize


def _stats(name: str, bits: float, x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    err = (x_hat.float() - x.float())
    mse = float(err.square().mean())
    power = float(x.float().square().mean())
    return {
        "format": name,
        "bits": bits,
        "rel_rmse": math.sqrt(mse / power) if power else 0.0,
        "max_abs": float(err.abs().max()) if err.numel() else 0.0,
        "sqnr_db": 10 * math.log10(power / mse) if mse > 0 and power > 0 else float("inf"),
    }


def format_error_report(rows: int, cols: int, seed: int = 0, outlier_fraction: float = 0.0) -> list[dict]:
    """Quantize a seeded N(0,1) tensor (optionally with outliers) in each format; one dict per format."""
    if rows <= 0 or cols <= 0 or cols % 32:
        raise ValueError(f"rows must be positive and cols a positive multiple of 32, got {rows}x{cols}")
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outliers must be in [0, 1), got {outlier_fraction}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if outlier_fraction:
        mask = torch.rand(rows, cols, generator=g) < outlier_fraction
        x = torch.where(mask, x * 20, x)
    out = [
        _stats("nvfp4 1x16", 4 + 8 / 16, x, quantize(x).dequantize()),
        _stats("nvfp4 16x16", 4 + 8 / 256, x, quantize(x, block=(16, 16)).dequantize()),
        _stats("nvfp4 4over6", 4 + 8 / 16, x, quantize(x, scale_rule="4over6").dequantize()),
        _stats("nvfp4 + RHT", 4 + 8 / 16, rht(x), quantize(rht(x)).dequantize()),
        _stats("mxfp4", 4 + 8 / 32, x, mx_dequantize(mx_quantize(x, "e2m1"))),
        _stats("mxfp8", 8 + 8 / 32, x, mx_dequantize(mx_quantize(x, "e4m3"))),
    ]
    return out
