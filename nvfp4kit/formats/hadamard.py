"""Blockwise random Hadamard transform (RHT), 16-point, orthonormal.

``H = diag(sign) @ Hadamard16 / 4`` applied to each group of 16 consecutive elements along ``dim``:
``y_block = x_block @ H``. H is orthonormal (H @ H.T == I), so applying it to both operands of a
product along their shared reduction dimension leaves the product unchanged, while spreading
outliers across the block before quantization (the NVFP4 recipe's wgrad operands).
"""

from __future__ import annotations

import torch

RHT_SIZE = 16
# One fixed sign vector for all layers and steps (Transformer Engine's).
DEFAULT_RHT_SIGN = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_matrix(n: int = RHT_SIZE, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), entries +-1, not normalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rht_matrix(sign=None, size: int = RHT_SIZE, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal transform ``diag(sign) @ Hadamard(size) / sqrt(size)``."""
    if sign is None:
        if size != RHT_SIZE:
            raise ValueError(f"rht: the default sign vector has {RHT_SIZE} entries; pass sign= for size {size}")
        sign = DEFAULT_RHT_SIGN
    sign = torch.as_tensor(sign, dtype=dtype, device=device).flatten()
    if sign.numel() != size:
        raise ValueError(f"rht: sign vector has {sign.numel()} entries, expected {size}")
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError("rht: sign vector entries must be +1 or -1")
    return sign.unsqueeze(1) * hadamard_matrix(size, dtype, device) / (size**0.5)


def _apply(x: torch.Tensor, dim: int, matrix: torch.Tensor, name: str) -> torch.Tensor:
    size = matrix.shape[0]
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {x.dtype}")
    dim = dim % x.ndim if x.ndim else 0
    if x.ndim == 0 or x.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of shape {tuple(x.shape)} must be a multiple of {size}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xm = x.movedim(dim, -1)
    xf = xm.to(compute).reshape(*xm.shape[:-1], xm.shape[-1] // size, size)
    y = (xf @ matrix.to(device=x.device, dtype=compute)).reshape(xm.shape)
    return y.to(x.dtype).movedim(-1, dim)


def rht(x: torch.Tensor, dim: int = -1, sign=None, size: int = RHT_SIZE) -> torch.Tensor:
    """Apply the blockwise RHT along ``dim`` (computed in float32, float64 for float64 input; returned in x's dtype)."""
    return _apply(x, dim, rht_matrix(sign, size), "rht")


def inverse_rht(x: torch.Tensor, dim: int = -1, sign=None, size: int = RHT_SIZE) -> torch.Tensor:
    """Undo :func:`rht` (multiply each block by H^T)."""
    return _apply(x, dim, rht_matrix(sign, size).t().contiguous(), "inverse_rht")


def rht_butterfly(x: torch.Tensor, sign=None) -> torch.Tensor:
    """The 16-point RHT along the last dim as the fused kernels compute it, in float32: each 16-group becomes
    ``((x * sign) @ Hadamard16) * 0.25`` with the Hadamard product as a butterfly over index bits
    0, 1, 2, 3 in that order (so the result is reproducible to the bit). Equals
    ``formats.hadamard.rht(x.float())`` up to float32 rounding of the sums."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"rht: expected a floating tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % RHT_SIZE:
        raise ValueError(f"rht: last dim of shape {tuple(x.shape)} must be a multiple of {RHT_SIZE}")
    s = torch.as_tensor(DEFAULT_RHT_SIGN if sign is None else sign, dtype=torch.float32, device=x.device)
    rht_matrix(s)  # validates the vector
    y = x.float().reshape(-1, RHT_SIZE) * s
    for h in (1, 2, 4, 8):
        v = y.reshape(-1, RHT_SIZE // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, RHT_SIZE)
    return (y * 0.25).reshape(x.shape)
