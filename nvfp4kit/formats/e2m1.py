"""E2M1 (FP4) elements: the code <-> value table, rounding, and nibble packing.

A code is 4 bits ``s e1 e0 m``: bit 3 is the sign, bits 0-2 index the magnitude table
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Two codes share a byte, element ``2i`` in the low nibble.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SIGN_BIT = 0x8

# Round-to-nearest-even decision points between neighbouring magnitudes. A magnitude
# equal to a threshold rounds towards the neighbour with the even mantissa bit (code
# 0, 2, 4, 6), so 0.25, 1.25, 2.5 and 5 round down while 0.75, 1.75 and 3.5 round up.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_ROUND_UP = (False, True, False, True, False, True, False)


def e2m1_value_table(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16 signed values indexed by code (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=dtype, device=device)
    return torch.cat([mags, -mags])


def _sign_code(v: torch.Tensor) -> torch.Tensor:
    return torch.signbit(v).to(torch.uint8) << 3


def e2m1_round_nearest(v: torch.Tensor) -> torch.Tensor:
    """RTNE codes (uint8, 0..15) of float values; magnitudes past 6 saturate to 6.

    The sign bit is copied from the input, so -0.0 and small negatives give code 8 (-0),
    as the hardware conversion does.
    """
    if v.dtype != torch.float32:
        v = v.float()
    a = v.abs()
    mag = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for t, up in zip(_MIDPOINTS, _TIES_ROUND_UP):
        mag += (a >= t) if up else (a > t)
    return mag | _sign_code(v)


def e2m1_round_stochastic(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastically rounded codes: each value goes to one of its two grid neighbours with
    probability proportional to proximity, so E[decode(code)] == v for |v| <= 6.

    Draws one uniform number per element from ``generator`` (float32, torch.rand).
    Magnitudes past 6 saturate to 6.
    """
    if v.dtype != torch.float32:
        v = v.float()
    a = v.abs().clamp(max=E2M1_MAX)
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=v.device)
    # index of the largest grid value <= a
    low = torch.bucketize(a, mags[1:], right=True).to(torch.uint8)
    high = (low + 1).clamp(max=7)
    lo_val = mags[low.long()]
    hi_val = mags[high.long()]
    gap = hi_val - lo_val
    frac = torch.where(gap > 0, (a - lo_val) / torch.where(gap > 0, gap, 1.0), 0.0)
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    mag = torch.where(u < frac, high, low)
    return mag | _sign_code(v)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of uint8 codes (only the low 4 bits are read)."""
    table = e2m1_value_table(dtype, codes.device)
    return table[(codes & 0xF).long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dim must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes (inverse of pack_nibbles)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles: expected uint8, got {packed.dtype}")
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
