"""Hypothesis properties of NVFP4 quantization (numerics.md section 5), over random shapes, dtypes,
scales and data kinds. Expected values come from the format definition, never from nvfp4kit."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_formats_reference import (
    DTYPES,
    E2M1_GRID,
    KINDS,
    SHAPES_1D,
    f32_bits,
    random_input,
    ref_e2m1_codes,
    ref_e2m1_value,
    ref_e4m3,
    ref_quantize,
)

import nvfp4kit as nk
from nvfp4kit.formats import e2m1

BLOCKS = st.sampled_from([(1, 16), (16, 16)])
SEEDS = st.integers(0, 2**32 - 1)


def codes_of(q) -> np.ndarray:
    """Unpacked codes read straight from the bytes (low nibble first)."""
    p = q.packed.numpy().astype(np.uint8)
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def block_scale_f64(q) -> np.ndarray:
    """Per-element float64 block scale s_b * g (blocks along the last dim)."""
    s = q.block_scale.float().numpy().astype(np.float64) * float(q.global_scale)
    return np.repeat(s, 16, axis=-1)


# ----------------------------------------------------------------------------- packing


@given(SEEDS, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 16)))
def test_unpack_pack_roundtrip(seed, shape):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*shape[:-1], 2 * shape[-1]), generator=g, dtype=torch.uint8)
    assert torch.equal(e2m1.unpack_nibbles(e2m1.pack_nibbles(codes)), codes)
    packed = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    assert torch.equal(e2m1.pack_nibbles(e2m1.unpack_nibbles(packed)), packed)


# ----------------------------------------------------------------------------- range and grid


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_values_on_the_scaled_grid_and_within_6(seed, shape, dtype, log2_scale, kind, block):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block)
    assert q.dtype == dtype and q.shape == x.shape
    deq = q.dequantize(torch.float32).numpy().astype(np.float64)
    S = block_scale_f64(q)
    vals = ref_e2m1_value(codes_of(q))
    assert np.all(np.abs(vals) <= 6)
    # each dequantized value is exactly code value * fp32(s_b * g)
    s32 = np.repeat((q.block_scale.float() * q.global_scale).numpy(), 16, axis=-1)
    np.testing.assert_array_equal(deq, (vals * s32).astype(np.float32))
    assert np.all(np.abs(deq) <= 6 * S * (1 + 2**-22))


def _grid_input(seed, shape, log2_g, with_subnormal_scales):
    """x = v * s_b * 2^k with v on the E2M1 grid, s_b an E4M3 value, one |v| = 6 per block (so the
    block amax maps back to s_b) and one block with s_b = 448 (so the tensor amax is 2688 * 2^k)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = math.prod(shape) // 16
    lo = 1 if with_subnormal_scales else 8  # E4M3 codes 1..7 are subnormal
    sb_bits = torch.randint(lo, 0x7F, (nblocks,), generator=g, dtype=torch.int32).to(torch.uint8)
    sb_bits[int(torch.randint(0, nblocks, (1,), generator=g))] = 0x7E  # 448
    sb = sb_bits.view(torch.float8_e4m3fn).float()
    codes = torch.randint(0, 16, (nblocks, 16), generator=g, dtype=torch.uint8)
    pos = torch.randint(0, 16, (nblocks,), generator=g)
    codes[torch.arange(nblocks), pos] = torch.where(torch.rand(nblocks, generator=g) < 0.5, 7, 15).to(torch.uint8)
    v = e2m1.e2m1_decode(codes)
    x = (v * sb[:, None] * 2.0**log2_g).reshape(shape)
    return x, codes.reshape(shape), sb_bits


@given(SEEDS, SHAPES_1D, st.integers(-40, 40), st.booleans())
def test_values_already_on_the_grid_roundtrip_exactly(seed, shape, log2_g, subnormal):
    x, codes, sb_bits = _grid_input(seed, shape, log2_g, subnormal)
    q = nk.quantize(x)
    assert float(q.global_scale) == 2.0**log2_g
    assert torch.equal(q.dequantize(), x)
    assert q.block_scale.view(torch.uint8).flatten().tolist() == sb_bits.tolist()
    got = codes_of(q)
    # zeros may carry either sign bit; all other codes are reproduced
    nz = (codes.numpy() & 7) != 0
    np.testing.assert_array_equal(got[nz], codes.numpy()[nz])


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_idempotence(seed, shape, dtype, log2_scale, kind, block):
    """quant(dequant(q)) == q: codes and block scales in every block whose scale is a normal E4M3
    number (subnormal scales may re-encode differently but represent the same values), and
    dequantized values within one float32 rounding of the global scale everywhere."""
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block)
    xh = q.dequantize(torch.float32)
    q2 = nk.quantize(xh, block=block)
    assert abs(float(q2.global_scale) - float(q.global_scale)) <= 2**-22 * float(q.global_scale)
    normal = (q.block_scale.float() >= 2.0**-6).numpy()
    np.testing.assert_array_equal(q2.block_scale.view(torch.uint8).numpy()[normal],
                                  q.block_scale.view(torch.uint8).numpy()[normal])
    c1 = codes_of(q).reshape(*normal.shape, 16)[normal]
    c2 = codes_of(q2).reshape(*normal.shape, 16)[normal]
    np.testing.assert_array_equal(ref_e2m1_value(c1), ref_e2m1_value(c2))
    np.testing.assert_allclose(q2.dequantize(torch.float32).numpy(), xh.numpy(), rtol=2**-21, atol=0)


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS,
       st.sampled_from(["nearest", "stochastic"]))
def test_sign_symmetry(seed, shape, dtype, log2_scale, kind, block, rounding):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    qp = nk.quantize(x, block=block, rounding=rounding, generator=torch.Generator().manual_seed(seed))
    qn = nk.quantize(-x, block=block, rounding=rounding, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(qp.block_scale.view(torch.uint8), qn.block_scale.view(torch.uint8))
    assert f32_bits(qp.global_scale) == f32_bits(qn.global_scale)
    # the sign bit is copied from the input, zeros included (+0 -> 0, -0 -> 8)
    np.testing.assert_array_equal(codes_of(qn), codes_of(qp) ^ 8)
    assert torch.equal(qn.dequantize(), -qp.dequantize())


def _half_step(t: np.ndarray) -> np.ndarray:
    """Half the width of the E2M1 grid interval containing t (t in [0, 6])."""
    grid = np.array(E2M1_GRID)
    i = np.clip(np.searchsorted(grid, t, side="right") - 1, 0, 6)
    return (grid[i + 1] - grid[i]) / 2


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_error_at_most_half_a_grid_step(seed, shape, dtype, log2_scale, kind, block):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block)
    xd = x.double().numpy()
    deq = q.dequantize(torch.float32).double().numpy()
    S = block_scale_f64(q)
    err = np.abs(xd - deq)
    slack = 2**-21 * (np.abs(xd) + np.abs(deq))
    pos = S > 0
    t = np.abs(xd[pos]) / S[pos]
    bound = (_half_step(np.minimum(t, 6)) + np.maximum(t - 6, 0)) * S[pos]
    assert np.all(err[pos] <= bound + slack[pos])
    # a zero block scale only happens when the block amax is below half the smallest subnormal scale
    g = float(q.global_scale)
    assert np.all(deq[~pos] == 0)
    assert np.all(np.abs(xd[~pos]) <= 6 * 2.0**-10 * g * (1 + 2**-20))


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_block_amax_reconstructed_within_e4m3_rounding(seed, shape, dtype, log2_scale, kind, block):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block)
    amax_b = np.abs(x.double().numpy())
    amax_b = amax_b.reshape(*amax_b.shape[:-1], -1, 16).max(-1)
    if block == (16, 16):
        a = amax_b.reshape(-1, amax_b.shape[-2], amax_b.shape[-1])
        for r0 in range(0, a.shape[1], 16):
            a[:, r0:r0 + 16] = a[:, r0:r0 + 16].max(1, keepdims=True)
        amax_b = a.reshape(amax_b.shape)
    g = float(q.global_scale)
    s = q.block_scale.double().numpy()
    recon = 6 * s * g
    normal = s >= 2.0**-6
    assert np.all(np.abs(recon - amax_b)[normal] <= (2.0**-4 + 2**-20) * amax_b[normal])
    assert np.all(np.abs(recon - amax_b)[~normal] <= 6 * 2.0**-10 * g * (1 + 2**-20))
    assert float(q.block_scale.float().max()) <= 448
    # the tensor amax lands on the largest scale (448) when the data sets the amax
    if float(x.abs().max()) > 0:
        assert float(q.block_scale.float().max()) == 448


@given(SEEDS, st.sampled_from([(16, 16), (32, 48), (48, 16), (2, 16, 32)]), st.sampled_from(DTYPES),
       st.integers(-20, 20), KINDS)
def test_2d_quantize_commutes_with_transpose(seed, shape, dtype, log2_scale, kind):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    a = nk.quantize(x, block=(16, 16))
    b = nk.quantize(x.transpose(-1, -2).contiguous(), block=(16, 16))
    if x.ndim == 2:
        at = a.t()
        assert isinstance(at, nk.NVFP4Tensor) and at.shape == b.shape
        assert torch.equal(at.packed, b.packed)
        assert torch.equal(at.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
        assert f32_bits(at.global_scale) == f32_bits(b.global_scale)
    assert torch.equal(a.dequantize().transpose(-1, -2), b.dequantize())


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-40, 40), KINDS, BLOCKS)
def test_scaling_by_power_of_two_leaves_codes_unchanged(seed, shape, dtype, k, kind, block):
    x = random_input(seed, shape, torch.float32, 0, kind)
    if dtype == torch.float16:
        k = max(min(k, 3), -3)
        x = x.clamp(-1000, 1000)
        x = torch.where(x.abs() < 2.0**-10, torch.zeros_like(x), x)  # stay clear of fp16 subnormals
    x = x.to(dtype)
    y = (x.float() * 2.0**k).to(dtype)
    assume(torch.equal(y.float(), x.float() * 2.0**k))
    qx = nk.quantize(x, block=block)
    qy = nk.quantize(y, block=block)
    assert torch.equal(qx.packed, qy.packed)
    assert torch.equal(qx.block_scale.view(torch.uint8), qy.block_scale.view(torch.uint8))
    if float(x.abs().max()) == 0:  # an all-zero tensor keeps global scale 1 (section 2: S_enc = 1 for amax 0)
        assert float(qy.global_scale) == float(qx.global_scale) == 1.0
    else:
        assert float(qy.global_scale) == float(qx.global_scale) * 2.0**k


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_bf16_fp16_inputs_quantize_like_their_float32_values(seed, shape, dtype, log2_scale, kind, block):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block)
    q32 = nk.quantize(x.float(), block=block)
    assert torch.equal(q.packed, q32.packed)
    assert torch.equal(q.block_scale.view(torch.uint8), q32.block_scale.view(torch.uint8))
    assert q.dequantize().dtype == dtype
    assert torch.equal(q.dequantize(), q32.dequantize().to(dtype))


# ----------------------------------------------------------------------------- stochastic rounding


def _sr_rows(values: torch.Tensor, n: int) -> torch.Tensor:
    """Rows [6, v1..v15] repeated n times with global_amax 2688: S_enc = 1 and every block scale is
    1, so the scaled values are exactly the inputs."""
    row = torch.cat([torch.tensor([6.0]), values])
    return row.expand(n, 16).contiguous()


@given(SEEDS, st.sampled_from(DTYPES))
def test_stochastic_rounding_draws_only_the_two_neighbours(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = random_input(seed, (8, 64), dtype, 0, "normal")
    q = nk.quantize(x, rounding="stochastic", generator=g)
    ref = ref_quantize(x)  # same scales; "scaled" holds the pre-rounding values
    assert torch.equal(q.block_scale.view(torch.uint8), torch.from_numpy(ref["scale_bits"]))
    t = np.abs(ref["scaled"].astype(np.float64))
    grid = np.array(E2M1_GRID)
    lo = grid[np.clip(np.searchsorted(grid, t, side="right") - 1, 0, 7)]
    hi = grid[np.clip(np.searchsorted(grid, t, side="left"), 0, 7)]
    got = ref_e2m1_value(codes_of(q))
    mag = np.abs(got)
    assert np.all((mag == lo) | (mag == hi))
    assert np.all(np.signbit(got) == np.signbit(ref["scaled"]))


def test_stochastic_rounding_is_unbiased():
    """For each value, the mean of many SR draws matches the value (z-score under 5)."""
    values = torch.tensor([0.1, 0.3, 0.6, 0.9, 1.1, 1.4, 1.6, 1.9, 2.2, 2.75, 3.3, 3.9, 4.5, 5.2, 5.9])
    n = 20000
    x = torch.cat([_sr_rows(values, n), -_sr_rows(values, n)])
    q = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1234), global_amax=2688.0)
    assert (q.block_scale.float() == 1).all() and float(q.global_scale) == 1.0
    deq = q.dequantize().double()
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
    for sign, rows in ((1, deq[:n]), (-1, deq[n:])):
        for j, v in enumerate(values.double().tolist()):
            col = rows[:, j + 1] * sign
            lo = grid[grid <= v].max()
            hi = grid[grid >= v].min()
            p = (v - lo) / (hi - lo)
            se = float(hi - lo) * math.sqrt(p * (1 - p) / n)
            assert abs(float(col.mean()) - v) <= 5 * se, (v, float(col.mean()))
    # and on random data the total error is unbiased
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(5))
    q = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(6))
    err = (q.dequantize().double() - x.double())
    assert abs(float(err.mean())) <= 5 * float(err.std()) / math.sqrt(err.numel())
    # while nearest rounding of the same values is measurably biased on this column set
    qn = nk.quantize(_sr_rows(values, 1), global_amax=2688.0)
    assert qn.dequantize()[0, 1:].tolist() != values.tolist()


def test_stochastic_rounding_is_seeded_by_the_generator():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    a = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    c = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.packed, b.packed)
    assert not torch.equal(a.packed, c.packed)
    # generator=None draws from torch's global generator
    torch.manual_seed(3)
    d = nk.quantize(x, rounding="stochastic")
    torch.manual_seed(3)
    e = nk.quantize(x, rounding="stochastic")
    assert torch.equal(d.packed, e.packed)
    # SR and RN share the scales
    r = nk.quantize(x)
    assert torch.equal(a.block_scale.view(torch.uint8), r.block_scale.view(torch.uint8))


def test_stochastic_rounding_keeps_grid_values():
    values = torch.tensor(E2M1_GRID[1:] + tuple(-v for v in E2M1_GRID[1:]) + (0.0,))
    x = _sr_rows(values, 500)
    q = nk.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(0), global_amax=2688.0)
    assert torch.equal(q.dequantize(), x)


# ----------------------------------------------------------------------------- Four Over Six


@given(SEEDS, SHAPES_1D, st.sampled_from(DTYPES), st.integers(-20, 20), KINDS, BLOCKS)
def test_four_over_six_keeps_the_better_of_the_two_mappings(seed, shape, dtype, log2_scale, kind, block):
    """Global scale from 6 * 256; per block (16x16: per tile) the scale maps the amax to 6 or to 4
    (a 1.5x larger scale), whichever gives the lower squared error."""
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x, block=block, scale_rule="4over6")
    amax = np.float32(x.float().abs().max())
    s_enc = np.float32(1536.0) / amax if amax > 0 else np.float32(1.0)
    assert f32_bits(q.global_scale) == f32_bits(np.float32(1.0) / np.float32(s_enc))
    xd = x.double().numpy()
    g = float(q.global_scale)
    amax_b = np.abs(xd).reshape(*xd.shape[:-1], -1, 16).max(-1)
    if block == (16, 16):
        a = amax_b.reshape(-1, *amax_b.shape[-2:])
        for r0 in range(0, a.shape[1], 16):
            a[:, r0:r0 + 16] = a[:, r0:r0 + 16].max(1, keepdims=True)
        amax_b = a.reshape(amax_b.shape)
    s = q.block_scale.double().numpy()
    # the chosen scale is the E4M3 rounding of amax_b * S_enc / 6 or of 1.5 times that
    s6 = ref_e4m3_of(amax_b * float(s_enc) / 6)
    s4 = ref_e4m3_of(amax_b * float(s_enc) / 4)

    def near(a, b):  # within one E4M3 step (the float64 candidates skip the float32 rounding order)
        return np.abs(a - b) <= 2.0**-3 * np.maximum(a, b) + 2.0**-9

    assert np.all(near(s, s6) | near(s, s4))

    def sq_err(scale):
        t = np.clip(xd / np.repeat(np.where(scale > 0, scale * g, 1), 16, -1), -6, 6)
        v = ref_e2m1_value(ref_e2m1_codes(t)) * np.repeat(scale * g, 16, -1)
        e = ((v - xd) ** 2).reshape(*xd.shape[:-1], -1, 16).sum(-1)
        return e

    # no block would be better off with the other candidate the core did not pick
    e_chosen = sq_err(s)
    other = np.where(near(s, s6), s4, s6)
    e_other = sq_err(other)
    if block == (1, 16):
        assert np.all(e_chosen <= e_other * (1 + 1e-5) + 1e-30)
    # and overall 4over6 is no worse than its own 6-only choice
    assert e_chosen.sum() <= sq_err(s6).sum() * (1 + 1e-5) + 1e-30


def ref_e4m3_of(v: np.ndarray) -> np.ndarray:
    return ref_e4m3(np.minimum(v, 448.0)).astype(np.float64)
