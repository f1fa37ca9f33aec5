"""Emulated NVFP4 GEMM: what an FP4 tensor core computes, in float32 on any device.

``out = (A_vals @ B_vals^T) * (g_a * g_b)`` where ``A_vals = e2m1(a) * fp32(block_scale_a)`` and the
same for B. Each ``A_vals`` entry is exact in float32 (a 2-bit-mantissa value times a 3-bit-mantissa
scale), so every per-block product is exact and the sums accumulate in float32; the two global
decode scales are applied once to the output, as the hardware's alpha.
"""

from __future__ import annotations

import torch

from .nvfp4 import NVFP4Parts, block_values


def nvfp4_gemm(a: NVFP4Parts, b: NVFP4Parts, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a [..., M, K] @ b [N, K]^T`` for two NVFP4 operands blocked along K -> ``[..., M, N]``."""
    ka = a.packed.shape[-1] * 2
    kb = b.packed.shape[-1] * 2
    if ka != kb or b.packed.ndim != 2:
        raise ValueError(
            f"nvfp4_gemm: operands must share K along their last dim, got a {tuple(a.packed.shape[:-1])}x{ka} "
            f"and b {tuple(b.packed.shape[:-1])}x{kb}"
        )
    alpha = a.global_decode_scale.float() * b.global_decode_scale.float()
    out = torch.matmul(block_values(a), block_values(b).t())
    return (out * alpha).to(out_dtype)

