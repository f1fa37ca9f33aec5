"""An independent NVFP4 reference (numpy, float32 step by step) and the core checked against it.

Nothing here calls nvfp4kit to compute an expected value:

* E4M3: all 256 bit patterns decoded from the bit layout; rounding is "nearest representable
  value, ties to the even bit pattern", found by search over that table (float64 distances, which
  are exact for these operands), saturating at 448.
* E2M1: nearest grid value, ties to the even code, read from the magnitude table.
* NVFP4: the canonical (TE kernel) formula order of numerics.md section 2, one numpy float32
  operation at a time (every numpy float32 op is one IEEE single-precision rounding).

Other test files import the ``ref_*`` helpers from here.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nvfp4kit as nk
from nvfp4kit.formats import e2m1, scales

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ============================================================================= E4M3 reference


def e4m3_decode_bits(bits: int) -> float:
    """Value of an E4M3 (fn variant) bit pattern, from the bit layout: s eeee mmm, bias 7."""
    s = -1.0 if bits & 0x80 else 1.0
    e = (bits >> 3) & 0xF
    m = bits & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return s * m * 2.0**-9  # subnormal: 0.mmm * 2^-6
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


E4M3_TABLE = np.array([e4m3_decode_bits(b) for b in range(256)], dtype=np.float64)
# non-negative finite codes 0x00..0x7E are increasing in value
E4M3_POS_CODES = np.arange(0x7F)
E4M3_POS_VALUES = E4M3_TABLE[:0x7F]


def ref_e4m3_bits(x) -> np.ndarray:
    """RTNE float -> E4M3 bit pattern (uint8), saturating to +-448; NaN not accepted."""
    x = np.asarray(x, dtype=np.float64)
    assert not np.isnan(x).any()
    a = np.minimum(np.abs(x), 448.0)
    hi = np.searchsorted(E4M3_POS_VALUES, a, side="left")  # first value >= a
    hi = np.minimum(hi, 0x7E)
    lo = np.where(E4M3_POS_VALUES[hi] == a, hi, hi - 1).clip(0)
    d_lo = a - E4M3_POS_VALUES[lo]
    d_hi = E4M3_POS_VALUES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    sign = (np.signbit(x)).astype(np.uint8) << 7
    return code | sign


def ref_e4m3(x) -> np.ndarray:
    """RTNE-saturating E4M3 value of x, as float32."""
    return E4M3_TABLE[ref_e4m3_bits(x)].astype(np.float32)


# ============================================================================= E2M1 reference


def ref_e2m1_codes(v) -> np.ndarray:
    """RTNE E2M1 codes (0..15) of float32 values; magnitudes past 6 go to 6; sign bit copied."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    grid = np.array(E2M1_GRID)
    dist = np.abs(a[..., None] - grid)  # [..., 8]
    best = dist.min(-1, keepdims=True)
    ties = dist == best
    # among the nearest, prefer the even code (mantissa bit 0)
    even = ties & (np.arange(8) % 2 == 0)
    code = np.where(even.any(-1), even.argmax(-1), ties.argmax(-1)).astype(np.uint8)
    return code | (np.signbit(v).astype(np.uint8) << 3)


def ref_e2m1_value(codes) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    mag = np.array(E2M1_GRID)[codes & 7]
    return np.where(codes & 8, -mag, mag)


def ref_pack(codes: np.ndarray) -> np.ndarray:
    """Plain loop: byte j = code[2j] | code[2j+1] << 4."""
    codes = np.asarray(codes, dtype=np.uint8)
    flat = codes.reshape(-1, codes.shape[-1])
    out = np.zeros((flat.shape[0], flat.shape[1] // 2), dtype=np.uint8)
    for r in range(flat.shape[0]):
        for j in range(flat.shape[1] // 2):
            out[r, j] = (int(flat[r, 2 * j]) & 0xF) | ((int(flat[r, 2 * j + 1]) & 0xF) << 4)
    return out.reshape(*codes.shape[:-1], codes.shape[-1] // 2)


# ============================================================================= NVFP4 reference


def ref_global_encode(amax) -> np.float32:
    amax = F32(amax)
    with np.errstate(divide="ignore", over="ignore"):
        s = F32(2688.0) / amax if amax != 0 else F32(np.inf)
    s = min(s, FLT_MAX)
    if amax == 0 or s == 0:
        s = F32(1.0)
    return F32(s)


def ref_block_amax(xf: np.ndarray, block) -> np.ndarray:
    """Loops over blocks; 2D: amax over the 16x16 tile (partial tiles at the bottom), per row."""
    K = xf.shape[-1]
    lead = xf.shape[:-1]
    out = np.zeros((*lead, K // 16), dtype=np.float32)
    if block == (1, 16):
        for idx in np.ndindex(*lead):
            for b in range(K // 16):
                out[idx + (b,)] = np.abs(xf[idx + (slice(b * 16, b * 16 + 16),)]).max()
        return out
    M = xf.shape[-2]
    for idx in np.ndindex(*xf.shape[:-2]):
        for r0 in range(0, M, 16):
            for b in range(K // 16):
                tile = xf[idx + (slice(r0, min(r0 + 16, M)), slice(b * 16, b * 16 + 16))]
                out[idx + (slice(r0, min(r0 + 16, M)), b)] = np.abs(tile).max()
    return out


def ref_quantize(x: torch.Tensor, block=(1, 16), global_amax=None):
    """The canonical order in numpy float32. Returns dict of codes, packed, scale bits/values,
    global encode/decode scales, the scaled pre-rounding values and the dequantized values."""
    xf = x.detach().to(torch.float32).cpu().numpy().astype(np.float32)
    amax = F32(np.abs(xf).max()) if global_amax is None and xf.size else F32(global_amax or 0.0)
    s_enc = ref_global_encode(amax)
    s_dec = F32(1.0) / s_enc
    inv6 = F32(1.0) / F32(6.0)
    factor = F32(s_enc * inv6)
    bam = ref_block_amax(xf, block)
    with np.errstate(over="ignore"):
        pre = np.minimum((bam * factor).astype(np.float32), FLT_MAX)
    sb_bits = ref_e4m3_bits(pre)
    sb = E4M3_TABLE[sb_bits].astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        enc = np.minimum((F32(1.0) / (sb * s_dec)).astype(np.float32), FLT_MAX)
    K = xf.shape[-1]
    xb = xf.reshape(*xf.shape[:-1], K // 16, 16)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.clip((xb * enc[..., None]).astype(np.float32), F32(-6), F32(6)).reshape(xf.shape)
    codes = ref_e2m1_codes(scaled)
    deq_scale = (sb * s_dec).astype(np.float32)
    vals = ref_e2m1_value(codes).astype(np.float32).reshape(*xf.shape[:-1], K // 16, 16)
    deq = (vals * deq_scale[..., None]).astype(np.float32).reshape(xf.shape)
    return {
        "codes": codes,
        "packed": ref_pack(codes),
        "scale_bits": sb_bits,
        "scale": sb,
        "s_enc": s_enc,
        "s_dec": s_dec,
        "scaled": scaled,
        "deq": deq,
    }


def f32_bits(v) -> int:
    return struct.unpack("<I", struct.pack("<f", float(v)))[0]


def assert_matches_ref(q, ref):
    """Bit-exact comparison of an NVFP4Tensor's parts with ref_quantize's output."""
    np.testing.assert_array_equal(q.block_scale.view(torch.uint8).numpy(), ref["scale_bits"])
    assert f32_bits(q.global_scale) == f32_bits(ref["s_dec"]), (float(q.global_scale), float(ref["s_dec"]))
    np.testing.assert_array_equal(q.packed.numpy(), ref["packed"])
    got = q.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), ref["deq"].view(np.uint32))


def random_input(seed: int, shape, dtype, log2_scale: int = 0, kind: str = "normal") -> torch.Tensor:
    """Test data: normal / heavy-tailed / wide dynamic range / with zero blocks / grid-ish values."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "heavy":
        x = torch.randn(shape, generator=g) ** 3
    elif kind == "wide":
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-24, 8, shape, generator=g).float())
    elif kind == "zeros":
        x = torch.randn(shape, generator=g)
        mask = torch.rand((*shape[:-1], shape[-1] // 16, 1), generator=g) < 0.3
        x = x.reshape(*shape[:-1], shape[-1] // 16, 16).masked_fill(mask, 0.0).reshape(shape)
    elif kind == "ties":
        # multiples of 1/8: many exact E2M1 midpoints after scaling by powers of two
        x = torch.randint(-48, 49, shape, generator=g).float() / 8
    else:
        raise ValueError(kind)
    x = x * 2.0**log2_scale
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max / 2
        x = x.clamp(-big, big)
    return x.to(dtype)


SHAPES_1D = st.tuples(st.integers(1, 3), st.integers(1, 9), st.sampled_from([16, 32, 48, 64]))
KINDS = st.sampled_from(["normal", "heavy", "wide", "zeros", "ties"])


# ============================================================================= tests of the reference itself


def test_reference_e4m3_table_known_points():
    # hand-written facts of the format: max, min normal, min subnormal, NaN patterns, 1.0
    assert E4M3_TABLE[0x7E] == 448.0
    assert E4M3_TABLE[0x08] == 2.0**-6
    assert E4M3_TABLE[0x01] == 2.0**-9
    assert E4M3_TABLE[0x38] == 1.0
    assert math.isnan(E4M3_TABLE[0x7F]) and math.isnan(E4M3_TABLE[0xFF])
    assert np.all(np.diff(E4M3_POS_VALUES) > 0)


def test_reference_e2m1_thresholds_match_spec_table():
    # numerics.md section 1, threshold form on |v|
    def spec(a):
        for bound, inclusive, val in ((0.25, True, 0), (0.75, False, 0.5), (1.25, True, 1), (1.75, False, 1.5),
                                      (2.5, True, 2), (3.5, False, 3), (5.0, True, 4)):
            if (a <= bound) if inclusive else (a < bound):
                return val
        return 6.0

    pts = np.array([0, 0.1, 0.25, 0.26, 0.74, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.49, 3.5, 5, 5.01, 6, 7, 1e9])
    assert [spec(a) for a in pts] == list(ref_e2m1_value(ref_e2m1_codes(pts)))


# ============================================================================= E4M3 against torch / the core


def test_e4m3_all_256_patterns_decode_like_torch():
    got = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(E4M3_TABLE))
    finite = ~np.isnan(E4M3_TABLE)
    np.testing.assert_array_equal(got[finite], E4M3_TABLE[finite])


def _around(v):
    """float32 values at, just below and just above v."""
    v = F32(v)
    return [np.nextafter(v, F32(-np.inf)), v, np.nextafter(v, F32(np.inf))]


def test_e4m3_rtne_every_midpoint_and_neighbours():
    """Every representable value, every midpoint between neighbours (ties to even), one float32
    ulp either side of each, past 448 (saturation) and the subnormal range."""
    pts = []
    for i in range(0x7F):
        pts += _around(E4M3_POS_VALUES[i])
        if i < 0x7E:
            pts += _around((E4M3_POS_VALUES[i] + E4M3_POS_VALUES[i + 1]) / 2)
    pts += _around(464.0) + _around(480.0) + [F32(1e6), FLT_MAX, F32(2.0**-10), F32(2.0**-11), F32(1e-30)]
    pts = np.array(pts, dtype=np.float32)
    pts = np.concatenate([pts, -pts])
    got = scales.e4m3_rtne(torch.from_numpy(pts)).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, ref_e4m3_bits(pts))


def test_e4m3_specific_boundaries():
    # hand-written vectors: 448 saturation, ties between subnormals and at the normal boundary
    cases = {
        448.0: 448.0, 460.0: 448.0, 464.0: 448.0, 1e30: 448.0, -500.0: -448.0,
        2.0**-10: 0.0,                 # tie between 0 and 2^-9 -> even (0)
        1.5 * 2.0**-9: 2.0 * 2.0**-9,  # tie between 1 and 2 (x 2^-9) -> even code 2
        2.5 * 2.0**-9: 2.0 * 2.0**-9,  # tie between 2 and 3 -> 2
        7.5 * 2.0**-9: 2.0**-6,        # tie between the largest subnormal and the smallest normal -> normal (even)
        1.0625: 1.0,                   # tie between 1 and 1.125 -> 1
        1.1875: 1.25,                  # tie between 1.125 and 1.25 -> 1.25
        432.0: 448.0,                  # tie between 416 and 448 -> 448 (mantissa 110 even)
        240.0: 240.0,
    }
    x = torch.tensor(list(cases.keys()), dtype=torch.float32)
    got = scales.e4m3_rtne(x).float().tolist()
    assert got == list(cases.values())


@given(st.integers(0, 2**32 - 1))
def test_e4m3_rtne_random_float32_bit_patterns(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=512, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    got = scales.e4m3_rtne(torch.from_numpy(x.copy())).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, ref_e4m3_bits(x))


# ============================================================================= E2M1


def test_e2m1_every_tie_and_neighbours():
    """Every tie of the E2M1 table (hand-written expected codes) and one float32 ulp either side."""
    ties = {0.25: (0, 0, 1), 0.75: (1, 2, 2), 1.25: (2, 2, 3), 1.75: (3, 4, 4),
            2.5: (4, 4, 5), 3.5: (5, 6, 6), 5.0: (6, 6, 7)}
    for t, (below, at, above) in ties.items():
        x = torch.tensor(np.array(_around(t), dtype=np.float32))
        for sign, sbit in ((1, 0), (-1, 8)):
            got = e2m1.e2m1_round_nearest(sign * x).tolist()
            assert got == [below | sbit, at | sbit, above | sbit], (t, sign, got)


def test_e2m1_grid_values_saturation_and_signed_zero():
    grid = torch.tensor(E2M1_GRID)
    assert e2m1.e2m1_round_nearest(grid).tolist() == list(range(8))
    assert e2m1.e2m1_round_nearest(-grid[1:]).tolist() == list(range(9, 16))
    assert e2m1.e2m1_round_nearest(torch.tensor([6.5, 7.0, 1e30, -9.0])).tolist() == [7, 7, 7, 15]
    # the sign bit is copied (documented): -0.0 and tiny negatives give code 8
    assert e2m1.e2m1_round_nearest(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [8, 8, 0]
    assert e2m1.e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@given(st.integers(0, 2**32 - 1), st.sampled_from(DTYPES))
def test_e2m1_round_nearest_matches_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1024, generator=g) * 3).to(dtype)
    # plus exact multiples of 1/4 (the ties and grid points)
    x = torch.cat([x, (torch.randint(-28, 29, (256,), generator=g).float() / 4).to(dtype)])
    got = e2m1.e2m1_round_nearest(x).numpy()
    np.testing.assert_array_equal(got, ref_e2m1_codes(x.float().numpy()))


def test_pack_low_nibble_first_hand_vector():
    codes = torch.tensor([[1, 2, 15, 0, 8, 7]], dtype=torch.uint8)
    assert e2m1.pack_nibbles(codes).tolist() == [[0x21, 0x0F, 0x78]]
    assert e2m1.unpack_nibbles(torch.tensor([[0x21, 0x0F, 0x78]], dtype=torch.uint8)).tolist() == codes.tolist()


@given(st.integers(0, 2**32 - 1), st.tuples(st.integers(1, 4), st.integers(1, 8)))
def test_pack_matches_loop_reference(seed, shape):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*shape[:-1], shape[-1] * 2), generator=g, dtype=torch.uint8)
    np.testing.assert_array_equal(e2m1.pack_nibbles(codes).numpy(), ref_pack(codes.numpy()))


# ============================================================================= global scales


@pytest.mark.parametrize(
    "amax", [1.0, 3.0, 448.0, 2688.0, 1e-3, 0.1, 7.0, 1e30, 1e-30, 2.0**-126, 1e-44, FLT_MAX, 123.456]
)
def test_global_scales_canonical(amax):
    s_enc = ref_global_encode(amax)
    s_dec = F32(1.0) / s_enc
    got_enc = nk.global_encode_scale(torch.tensor(amax, dtype=torch.float32))
    got_dec = nk.global_decode_scale(torch.tensor(amax, dtype=torch.float32))
    assert got_enc.dtype == torch.float32 and got_dec.dtype == torch.float32
    assert f32_bits(got_enc) == f32_bits(s_enc)
    assert f32_bits(got_dec) == f32_bits(s_dec)
    assert f32_bits(nk.decode_from_encode(got_enc)) == f32_bits(s_dec)
    with np.errstate(over="ignore"):
        back = F32(1.0) / s_dec
    assert f32_bits(nk.encode_from_decode(got_dec)) == f32_bits(back)


def test_global_scales_special_amax():
    # amax 0 and inf both give S_enc = 1 (numerics.md section 2)
    assert float(nk.global_encode_scale(torch.tensor(0.0))) == 1.0
    assert float(nk.global_encode_scale(torch.tensor(float("inf")))) == 1.0
    assert float(nk.global_decode_scale(torch.tensor(0.0))) == 1.0
    # a tiny amax clamps S_enc to FLT_MAX instead of inf
    assert float(nk.global_encode_scale(torch.tensor(1e-45))) == float(FLT_MAX)
    with pytest.raises(ValueError):
        nk.global_encode_scale(torch.tensor(float("nan")))


# ============================================================================= quantize, bit-exact


@given(
    seed=st.integers(0, 2**32 - 1),
    shape=SHAPES_1D,
    dtype=st.sampled_from(DTYPES + (torch.float64,)),
    log2_scale=st.integers(-30, 30),
    kind=KINDS,
)
def test_quantize_1d_bit_exact_against_reference(seed, shape, dtype, log2_scale, kind):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 8), -8)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x)
    assert isinstance(q, nk.NVFP4Tensor)
    assert q.shape == x.shape
    assert q.packed.shape == (*shape[:-1], shape[-1] // 2) and q.packed.dtype == torch.uint8
    assert q.block_scale.shape == (*shape[:-1], shape[-1] // 16) and q.block_scale.dtype == torch.float8_e4m3fn
    assert q.global_scale.shape == () and q.global_scale.dtype == torch.float32
    assert_matches_ref(q, ref_quantize(x))


@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 40), st.sampled_from([16, 32, 48])),
    dtype=st.sampled_from(DTYPES),
    log2_scale=st.integers(-20, 20),
    kind=KINDS,
)
def test_quantize_2d_bit_exact_against_reference(seed, shape, dtype, log2_scale, kind):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 8), -8)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    if shape[0] == 1 and seed % 2:
        x = x[0]  # plain matrices too
    q = nk.quantize(x, block=(16, 16))
    assert_matches_ref(q, ref_quantize(x, block=(16, 16)))


@given(
    seed=st.integers(0, 2**32 - 1),
    shape=SHAPES_1D,
    ratio=st.sampled_from([0.0, 0.01, 0.3, 0.999, 1.0, 1.5, 10.0, 1e6]),
    block=st.sampled_from([(1, 16), (16, 16)]),
)
def test_quantize_with_global_amax_bit_exact(seed, shape, ratio, block):
    """A caller-supplied amax (larger: headroom; smaller: saturation at 448 / +-6)."""
    x = random_input(seed, shape, torch.float32)
    amax = float(x.abs().max()) * ratio
    q = nk.quantize(x, block=block, global_amax=amax)
    assert_matches_ref(q, ref_quantize(x, block=block, global_amax=amax))


def test_subnormal_block_scales_bit_exact():
    """Blocks far below the tensor amax get subnormal (and zero) E4M3 scales."""
    rows = [torch.full((16,), 2688.0)]  # sets amax = 2688: S_enc = 1, s_b = block_amax / 6
    for m in range(1, 9):
        rows.append(torch.linspace(-m * 2.0**-9 * 6, m * 2.0**-9 * 6, 16))
    rows.append(torch.full((16,), 2.0**-10 * 6))  # exactly a tie between 0 and 2^-9 -> scale 0
    rows.append(torch.full((16,), 2.0**-12))
    x = torch.stack(rows)
    q = nk.quantize(x)
    ref = ref_quantize(x)
    assert_matches_ref(q, ref)
    expected = [448.0] + [m * 2.0**-9 for m in range(1, 9)] + [0.0, 0.0]
    assert q.block_scale.float().flatten().tolist() == expected
    # zero-scale blocks dequantize to zero
    assert (q.dequantize()[-2:] == 0).all()
