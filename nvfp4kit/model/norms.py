"""RMSNorm (computed in fp32, cast back, times weight) and the gated grouped RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = _up(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedGroupRMSNorm(torch.nn.Module):
    """``rmsnorm_per_group(y * silu(z)) * weight`` with groups of ``dim // groups`` channels
    (gate applied before the norm: norm_before_gate=False)."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if dim % groups:
            raise ValueError(f"GatedGroupRMSNorm: dim {dim} is not divisible by {groups} groups")
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = _up(y) * F.silu(_up(z).to(_up(y).dtype))
        shape = h.shape
        h = h.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.reshape(shape).to(dtype)
