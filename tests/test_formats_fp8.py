"""The one per-tensor FP8 formula (formats/fp8.py): decode-direction scale, bit equality with the
formula every caller used before where it was already that order, and with what a loader computes
from a stored scale."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nvfp4kit.formats.fp8 import fp8_dequantize, fp8_fake_quant, fp8_quantize, fp8_scale

E4M3_MAX = 448.0


def e4m3_nearest_even(v: torch.Tensor) -> torch.Tensor:
    """Independent E4M3 rounding: the nearest of all 254 finite non-negative codes' values (ties to the
    even code), saturating at 448, sign kept."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # 0x7F is NaN
    values = codes.view(torch.float8_e4m3fn).double()
    a = v.double().abs().clamp(max=E4M3_MAX).reshape(-1, 1)
    dist = (a - values.reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    # among tied codes prefer the even one
    pick = torch.where(ties & (codes.reshape(1, -1) % 2 == 0), 1, 0) * 2 + ties.int()
    idx = pick.argmax(dim=1)
    out = values[idx].reshape(v.shape)
    return torch.where(v < 0, -out, out).float()


def decode_order_reference(x: torch.Tensor, amax: float):
    """What the PTQ weights, the streaming conversion, QAT and the evaluation emulation computed before
    they shared one module: s = float32(amax) / 448 in float32, q = e4m3(x / s), x_hat = q * s."""
    a = torch.tensor(amax, dtype=torch.float32)
    s = a / torch.tensor(E4M3_MAX, dtype=torch.float32) if amax > 0 else torch.tensor(1.0)
    q = e4m3_nearest_even(x.float() / s)
    return q, s


FLOATS = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(values=st.lists(FLOATS, min_size=1, max_size=64), headroom=st.floats(0.25, 4.0))
def test_matches_the_decode_order_formula_bit_for_bit(values, headroom):
    x = torch.tensor(values, dtype=torch.float32)
    amax = (x.abs().max() * headroom).float()  # headroom below 1: values beyond the amax saturate at 448
    q, s = fp8_quantize(x, amax)
    q_ref, s_ref = decode_order_reference(x, float(amax))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
    assert float(s) == float(s_ref)
    assert torch.equal(q.float(), q_ref)
    assert torch.equal(fp8_fake_quant(x, amax), q_ref * s_ref)
    assert torch.equal(fp8_quantize(x, scale=s_ref)[0].float(), q_ref)  # a given (stored) scale


@given(amax=st.floats(2.0**-100, 2.0**100, width=32))
def test_scale_is_float32_of_amax_over_448_and_survives_a_stored_round_trip(amax):
    s = fp8_scale(torch.tensor(amax, dtype=torch.float32))
    assert float(s) == float(torch.tensor(amax, dtype=torch.float32) / torch.tensor(E4M3_MAX))
    # a loader reads the stored scale back as amax = s * 448 (exact in float64, not always a float32)
    back = float(s.double()) * E4M3_MAX
    assert torch.equal(fp8_scale(back), s)


def test_zero_saturation_and_bad_input():
    assert float(fp8_scale(0.0)) == 1.0
    q, s = fp8_quantize(torch.zeros(3), 0.0)
    assert float(s) == 1.0 and torch.equal(q.float(), torch.zeros(3))
    q, s = fp8_quantize(torch.tensor([10.0, -20.0, 1.0]), 5.0)  # amax below the data: saturates at +-448
    assert torch.equal(q.float(), torch.tensor([448.0, -448.0, 1.0 / float(s)]).clamp(-448, 448).to(
        torch.float8_e4m3fn).float())
    assert torch.equal(fp8_dequantize(q, s), q.float() * s)
    with pytest.raises(ValueError, match="w1.*NaN"):
        fp8_quantize(torch.tensor([1.0, math.nan]), name="w1")
    with pytest.raises(ValueError, match="non-negative"):
        fp8_scale(-1.0)
    with pytest.raises(TypeError, match="floating"):
        fp8_quantize(torch.tensor([1, 2]))


def test_the_encode_order_is_a_different_formula():
    """The training recipe's FP8 used to multiply by an encode-direction 448/amax; that order rounds
    differently for some inputs, which is why one order (the stored decode scale's) was chosen."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=g) * 3
    amax = torch.tensor(2.9)
    enc = torch.tensor(E4M3_MAX) / amax
    old = torch.clamp(x * enc, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / enc
    new = fp8_fake_quant(x, amax)
    assert not torch.equal(old, new)
    assert float((old - new).abs().max()) <= float(amax) / E4M3_MAX * 32  # one E4M3 step at the top binade
