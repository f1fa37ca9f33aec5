"""MXFP8 / MXFP4 against an independent reference: exact E8M0 exponents from rational arithmetic,
E4M3 / E2M1 element rounding from the reference tables."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_formats_reference import DTYPES, random_input, ref_e2m1_codes, ref_e2m1_value, ref_e4m3, ref_pack

import nvfp4kit as nk

ELEM_MAX = {"e4m3": 448, "e2m1": 6}
ELEM_EMAX = {"e4m3": 8, "e2m1": 2}


def ref_exponent(amax: float, element: str, rule: str) -> int:
    """Exact E8M0 exponent of one block: rceil = smallest e with 2^e >= amax / elem_max;
    floor = floor(log2(amax)) - emax (OCP); zero blocks get -127; clamped to [-127, 127]."""
    if amax == 0:
        return -127
    if rule == "rceil":
        ratio = Fraction(amax) / ELEM_MAX[element]
        e = math.floor(math.log2(ratio))  # approximate start, then fix exactly
        while Fraction(2) ** e < ratio:
            e += 1
        while Fraction(2) ** (e - 1) >= ratio:
            e -= 1
    else:
        m, ex = math.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1)
        e = (ex - 1) - ELEM_EMAX[element]
    return max(-127, min(127, e))


def ref_mx(x: torch.Tensor, element: str, rule: str):
    xf = x.float().numpy().astype(np.float64)
    K = xf.shape[-1]
    xb = xf.reshape(*xf.shape[:-1], K // 32, 32)
    amax = np.abs(xb).max(-1) if xb.size else np.zeros(xb.shape[:-1])
    exps = np.vectorize(lambda a: ref_exponent(float(a), element, rule), otypes=[np.int64])(amax) if amax.size \
        else np.zeros(amax.shape, dtype=np.int64)
    scaled = xb * np.exp2(-exps.astype(np.float64))[..., None]
    if element == "e4m3":
        data = ref_e4m3(scaled).reshape(xf.shape)
        vals = data.astype(np.float64)
    else:
        codes = ref_e2m1_codes(np.clip(scaled, -6, 6)).reshape(xf.shape)
        data = ref_pack(codes)
        vals = ref_e2m1_value(codes)
    deq = (vals.reshape(xb.shape) * np.exp2(exps.astype(np.float64))[..., None]).reshape(xf.shape)
    return {"exp": exps, "bits": (exps + 127).astype(np.uint8), "data": data, "deq": deq}


def check_against_ref(parts, ref, element):
    np.testing.assert_array_equal(parts.scale.view(torch.uint8).numpy(), ref["bits"])
    if element == "e4m3":
        np.testing.assert_array_equal(parts.data.float().numpy(), ref["data"])
    else:
        np.testing.assert_array_equal(parts.data.numpy(), ref["data"])
    np.testing.assert_array_equal(nk.mx_dequantize(parts).double().numpy(), ref["deq"].astype(np.float32))


@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.sampled_from([32, 64, 96])),
    dtype=st.sampled_from(DTYPES),
    log2_scale=st.integers(-40, 40),
    kind=st.sampled_from(["normal", "heavy", "wide", "ties"]),
    element=st.sampled_from(["e4m3", "e2m1"]),
    rule=st.sampled_from(["rceil", "floor"]),
)
def test_mx_quantize_matches_reference(seed, shape, dtype, log2_scale, kind, element, rule):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    parts = nk.mx_quantize(x, element, rule)
    assert parts.scale.dtype == torch.float8_e8m0fnu and parts.scale.shape == (*shape[:-1], shape[-1] // 32)
    if element == "e4m3":
        assert parts.data.dtype == torch.float8_e4m3fn and parts.data.shape == x.shape
    else:
        assert parts.data.dtype == torch.uint8 and parts.data.shape == (*shape[:-1], shape[-1] // 2)
    check_against_ref(parts, ref_mx(x, element, rule), element)


@pytest.mark.parametrize("element", ["e4m3", "e2m1"])
def test_scale_exponents_at_power_of_two_boundaries(element):
    """Block amaxes exactly at elem_max * 2^k and one float32 ulp either side, for both rules."""
    m = ELEM_MAX[element]
    amaxes = []
    for k in range(-30, 31, 3):
        v = np.float32(m * 2.0**k)
        amaxes += [np.nextafter(v, np.float32(0)), v, np.nextafter(v, np.float32(np.inf))]
        w = np.float32(2.0**k)
        amaxes += [np.nextafter(w, np.float32(0)), w, np.nextafter(w, np.float32(np.inf))]
    rows = torch.zeros(len(amaxes), 32)
    rows[:, 0] = torch.tensor(np.array(amaxes, dtype=np.float32))
    rows[:, 1] = -rows[:, 0] / 3
    for rule in ("rceil", "floor"):
        parts = nk.mx_quantize(rows, element, rule)
        got = parts.scale.view(torch.uint8).flatten().to(torch.int64) - 127
        expected = [ref_exponent(float(a), element, rule) for a in amaxes]
        assert got.tolist() == expected, rule
        check_against_ref(parts, ref_mx(rows, element, rule), element)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["e4m3", "e2m1"]), st.integers(-60, 60))
def test_rceil_never_saturates_and_floor_may(seed, element, log2_scale):
    x = random_input(seed, (4, 64), torch.float32, log2_scale, "heavy")
    m = ELEM_MAX[element]
    xb = x.double().reshape(4, 2, 32)
    amax = xb.abs().amax(-1)
    for rule in ("rceil", "floor"):
        parts = nk.mx_quantize(x, element, rule)
        scale = 2.0 ** (parts.scale.view(torch.uint8).double() - 127)
        top = amax / scale  # the block max in element units, before rounding
        nz = amax > 0
        if rule == "rceil":
            assert (top[nz] <= m).all() and (top[nz] > m / 2).all()
        else:
            emax = ELEM_EMAX[element]
            assert (top[nz] >= 2.0**emax).all() and (top[nz] < 2.0 ** (emax + 1)).all()


def test_e8m0_decoding_and_zero_blocks():
    from nvfp4kit.formats import scales

    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = scales.e8m0_to_float(bits.view(torch.float8_e8m0fnu))
    expected = [2.0 ** (b - 127) for b in range(255)]
    assert got[:255].tolist() == expected  # 2^-127 is a float32 subnormal, kept exactly
    assert math.isnan(float(got[255]))
    # torch's own E8M0 decode agrees on every finite code
    assert torch.equal(bits[:255].view(torch.float8_e8m0fnu).float(), got[:255])
    for element in ("e4m3", "e2m1"):
        parts = nk.mx_quantize(torch.zeros(2, 64), element)
        assert (parts.scale.view(torch.uint8) == 0).all()  # 2^-127
        assert (nk.mx_dequantize(parts) == 0).all()


def test_mxfp8_and_mxfp4_helpers_and_dtypes():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    a = nk.mxfp8_quantize(x)
    b = nk.mx_quantize(x, "e4m3", "rceil")
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and a.element == "e4m3"
    c = nk.mxfp4_quantize(x, scale_rule="floor")
    check_against_ref(c, ref_mx(x, "e2m1", "floor"), "e2m1")
    assert nk.mx_dequantize(a, torch.bfloat16).dtype == torch.bfloat16
    # error is within half an element step of the block scale
    deq = nk.mx_dequantize(a).double()
    scale = (2.0 ** (a.scale.view(torch.uint8).double() - 127)).repeat_interleave(32, -1)
    # half an E4M3 ulp in the top binade [256, 448] is 16
    assert ((deq - x.double()).abs() <= scale * 16).all()


def test_bad_mx_inputs_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        nk.mx_quantize(torch.randn(2, 48))
    with pytest.raises(TypeError):
        nk.mx_quantize(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or inf"):
        nk.mx_quantize(torch.tensor([float("nan")] + [1.0] * 31))
    with pytest.raises(ValueError, match="NaN or inf"):
        nk.mxfp4_quantize(torch.tensor([float("inf")] + [1.0] * 31))
    with pytest.raises(ValueError, match="element"):
        nk.mx_quantize(torch.randn(2, 32), "e5m2")
    with pytest.raises(ValueError, match="scale_rule"):
        nk.mx_quantize(torch.randn(2, 32), "e4m3", "round")


@pytest.mark.parametrize("element", ["e4m3", "e2m1"])
def test_float64_beyond_float32_range_raises_like_nvfp4(element):
    """mx_quantize documents the NVFP4 input policy: float64 values past FLT_MAX must raise rather
    than turn into inf (and zero the rest of their block) in the float32 cast."""
    x = torch.ones(2, 32, dtype=torch.float64)
    x[0, 0] = 1e39
    with pytest.raises(ValueError, match="float32 range"):
        nk.mx_quantize(x, element)
    nk.mx_quantize(torch.ones(2, 32, dtype=torch.float64), element)  # in range: fine
