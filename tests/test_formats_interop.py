"""Agreement with torchao's NVFP4Tensor and modelopt's NVFP4QTensor, and their known differences.

Both peers use a different arithmetic order from nvfp4kit's canonical (TE kernel) one
(numerics.md section 2; docs/interop.md). The tests

1. pin down each peer's order: a numpy float32 model of it, written from reading its source, must
   reproduce the peer bit for bit (so the comparisons below rest on measured facts);
2. show that packing and the dequantize formula are the same in all three (parts are exchangeable);
3. assert that the differences on quantization are exactly the documented ones, no more:
   global scale within one float32 ulp; block scales equal except the peer's floor on small scales
   and one E4M3 step where the float32 pre-rounding values straddle an E4M3 midpoint; codes equal
   in blocks with equal scales except one E2M1 step where the scaled values straddle a threshold;
   plus the documented edge policies (zero blocks, -0.0);
4. construct inputs where those rare differences do happen, to show they are real.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_formats_reference import (
    E4M3_POS_VALUES,
    F32,
    f32_bits,
    random_input,
    ref_e2m1_codes,
    ref_e4m3,
    ref_e4m3_bits,
    ref_global_encode,
    ref_pack,
    ref_quantize,
)

import nvfp4kit as nk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization.qtensor.nvfp4_tensor as mo
    import torchao.prototype.mx_formats.nvfp4_tensor as ao

E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SEEDS = st.integers(0, 2**32 - 1)
SHAPES = st.tuples(st.integers(1, 8), st.sampled_from([16, 32, 64]))
KINDS = st.sampled_from(["normal", "heavy", "wide", "zeros", "ties"])


# ============================================================================= models of the peers' order


def _blocks(xf):
    return xf.reshape(*xf.shape[:-1], -1, 16)


def model_torchao(x: torch.Tensor, g) -> dict:
    """torchao two-level path: s_b = e4m3(clamp((amax_b / 6) / g, 2^-6, 448)),
    data = x * ((1 / g) / s_b), clamp +-6, RTNE, sign bit copied."""
    xf = x.float().numpy()
    g = F32(g)
    xb = _blocks(xf)
    amax_b = np.abs(xb).max(-1)
    pre = ((amax_b / F32(6)).astype(np.float32) / g).astype(np.float32)
    s = ref_e4m3(np.clip(pre, F32(2**-6), F32(448)))
    recip = ((F32(1) / g) / s).astype(np.float32)
    scaled = np.clip((xb * recip[..., None]).astype(np.float32), F32(-6), F32(6)).reshape(xf.shape)
    codes = ref_e2m1_codes(scaled)
    return {"pre": pre, "scale": s, "scaled": scaled, "codes": codes, "packed": ref_pack(codes), "g": g}


def model_modelopt(x: torch.Tensor) -> dict:
    """modelopt dynamic path: g = amax / 2688; s_b = amax_b / (6 * g), 0 -> 1.0, clamp [2^-9, 448],
    e4m3; data = x / (s_b * g) (true division); RTNE; sign from (x < 0), so -0.0 -> +0."""
    xf = x.float().numpy()
    g = F32(F32(np.abs(xf).max()) / F32(2688))
    xb = _blocks(xf)
    amax_b = np.abs(xb).max(-1)
    pre = (amax_b / F32(F32(6) * g)).astype(np.float32)
    pre = np.where(pre == 0, F32(1), pre)
    s = ref_e4m3(np.clip(pre, F32(2**-9), F32(448)))
    scaled = (xb / (s * g).astype(np.float32)[..., None]).astype(np.float32).reshape(xf.shape)
    codes = ref_e2m1_codes(scaled)
    codes = np.where(scaled == 0, 0, codes).astype(np.uint8)
    return {"pre": pre, "scale": s, "scaled": scaled, "codes": codes, "packed": ref_pack(codes), "g": g}


# ============================================================================= running the peers


def run_torchao(x: torch.Tensor, per_tensor_scale: torch.Tensor):
    t = ao.NVFP4Tensor.to_nvfp4(x.contiguous(), per_tensor_scale=per_tensor_scale.reshape(()).float())
    return t


def run_modelopt(x: torch.Tensor):
    q, s, s2 = mo.NVFP4QTensor.quantize(x, 16)
    return q, s, s2


def modelopt_dequantize(q, s, s2, dtype=torch.float32):
    return q.dequantize(dtype=dtype, scale=s, double_scale=s2, block_sizes={-1: 16})


def codes_from_packed(p: np.ndarray) -> np.ndarray:
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def grid_value(codes: np.ndarray) -> np.ndarray:
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    return np.where(codes & 8, -1, 1) * mags[codes & 7]


def e4m3_midpoint_between(a, b) -> np.ndarray:
    """Whether some E4M3 rounding midpoint m satisfies min(a, b) <= m <= max(a, b)."""
    mids = (E4M3_POS_VALUES[:-1] + E4M3_POS_VALUES[1:]) / 2
    lo = np.minimum(a, b).astype(np.float64)
    hi = np.maximum(a, b).astype(np.float64)
    i = np.searchsorted(mids, lo, side="left")
    return (i < len(mids)) & (mids[np.minimum(i, len(mids) - 1)] <= hi)


def e2m1_threshold_between(a, b) -> np.ndarray:
    lo = np.minimum(np.abs(a), np.abs(b)).astype(np.float64)
    hi = np.maximum(np.abs(a), np.abs(b)).astype(np.float64)
    return np.any([(lo <= t) & (t <= hi) for t in E2M1_THRESHOLDS], axis=0)


# ============================================================================= 1. the peers' order


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16]), st.integers(-20, 20), KINDS,
       st.booleans())
def test_torchao_follows_the_modelled_order(seed, shape, dtype, log2_scale, kind, our_g):
    x = random_input(seed, shape, dtype, log2_scale, kind)
    amax = x.float().abs().max()
    if float(amax) == 0 and not our_g:
        return  # torchao's per-tensor scale of an all-zero tensor is 0 and it divides by it; not a comparison point
    g = nk.quantize(x).global_scale if our_g else ao.per_tensor_amax_to_scale(amax)
    t = run_torchao(x, g)
    m = model_torchao(x, g)
    np.testing.assert_array_equal(t.scale.float().numpy(), m["scale"])
    np.testing.assert_array_equal(t.qdata.view(torch.uint8).numpy(), m["packed"])
    if not our_g:
        assert f32_bits(g) == f32_bits(F32(F32(amax) / F32(2688)))


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(-20, 20), KINDS)
def test_modelopt_follows_the_modelled_order(seed, shape, dtype, log2_scale, kind):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    if float(x.abs().max()) == 0:
        return  # modelopt divides by a zero global scale here; not a comparison point
    q, s, s2 = run_modelopt(x)
    m = model_modelopt(x)
    assert f32_bits(s2) == f32_bits(m["g"])
    np.testing.assert_array_equal(s.float().numpy(), m["scale"])
    np.testing.assert_array_equal(q._quantized_data.numpy(), m["packed"])


# ============================================================================= 2. same packing, same dequantize


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16]), KINDS)
def test_parts_are_exchangeable_with_torchao(seed, shape, dtype, kind):
    x = random_input(seed, shape, dtype, 0, kind)
    q = nk.quantize(x)
    # ours -> torchao
    t = ao.NVFP4Tensor(q.packed, q.block_scale, 16, dtype, q.global_scale.clone())
    assert torch.equal(t.dequantize(torch.float32), q.dequantize(torch.float32))
    # torchao -> ours
    t2 = run_torchao(x, ao.per_tensor_amax_to_scale(x.float().abs().max()))
    ours = nk.NVFP4Tensor(t2.qdata.view(torch.uint8), t2.scale, t2.per_tensor_scale, dtype)
    # an all-zero tensor gets torchao per-tensor scale 0 and NaN block scales: both sides then give NaN alike
    torch.testing.assert_close(ours.dequantize(torch.float32), t2.dequantize(torch.float32), rtol=0, atol=0,
                               equal_nan=float(x.float().abs().max()) == 0)


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), KINDS)
def test_parts_are_exchangeable_with_modelopt(seed, shape, dtype, kind):
    x = random_input(seed, shape, dtype, 0, kind)
    assume_nonzero = float(x.abs().max()) > 0
    q = nk.quantize(x)
    # ours -> modelopt (its weight / weight_scale / weight_scale_2 are our packed / block_scale / decode scale)
    mq = mo.NVFP4QTensor(x.shape, dtype, q.packed)
    got = modelopt_dequantize(mq, q.block_scale, q.global_scale, torch.float32)
    assert torch.equal(got, q.dequantize(torch.float32))
    if assume_nonzero:
        mq2, s, s2 = run_modelopt(x)
        ours = nk.NVFP4Tensor(mq2._quantized_data, s, s2, dtype)
        assert torch.equal(ours.dequantize(torch.float32), modelopt_dequantize(mq2, s, s2, torch.float32))


# ============================================================================= 3. the differences, exactly


def test_global_decode_scale_within_one_ulp_of_amax_over_2688():
    """Peers compute g = amax / 2688 (one division); nvfp4kit g = 1 / (2688 / amax) (two). Over a
    sweep of amaxes the two agree or differ by exactly one float32 ulp, and both cases occur."""
    rng = np.random.default_rng(0)
    amaxes = (rng.uniform(1, 2, 4000) * np.exp2(rng.integers(-60, 60, 4000))).astype(np.float32)
    ours = nk.global_decode_scale(torch.from_numpy(amaxes)).numpy()
    peer_ao = ao.per_tensor_amax_to_scale(torch.from_numpy(amaxes)).numpy()
    peer_mo = amaxes / np.float32(2688)  # modelopt's get_weights_scaling_factor_2, elementwise
    for peer in (peer_ao, peer_mo):
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - peer.view(np.int32).astype(np.int64))
        assert ulps.max() == 1
        frac = (ulps == 1).mean()
        assert 0.05 < frac < 0.6, frac  # measured: about a fifth of amaxes differ


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16]), st.integers(-20, 20), KINDS)
def test_differences_from_torchao_are_exactly_the_documented_ones(seed, shape, dtype, log2_scale, kind):
    x = random_input(seed, shape, dtype, log2_scale, kind)
    q = nk.quantize(x)
    t = run_torchao(x, q.global_scale)  # same global scale: isolate the block-level differences
    mt = model_torchao(x, q.global_scale)
    r = ref_quantize(x)
    s_ours = q.block_scale.float().numpy()
    s_ao = t.scale.float().numpy()
    # (a) torchao floors block scales at the smallest normal E4M3 (2^-6): no subnormal or zero scales
    floored = mt["pre"] < 2**-6
    assert np.all(s_ao[floored] == 2**-6)
    assert np.all(s_ours[floored] <= 2**-6)
    # (b) elsewhere: equal, or one E4M3 step apart where the two float32 pre-rounding values
    #     (ours: amax_b * (S_enc * 1/6); torchao: (amax_b / 6) / g) straddle an E4M3 midpoint
    amax_b = np.abs(_blocks(x.float().numpy())).max(-1)
    pre_ours = np.minimum((amax_b * F32(r["s_enc"] * (F32(1) / F32(6)))).astype(np.float32), F32(448))
    diff = (s_ours != s_ao) & ~floored
    step = np.abs(q.block_scale.view(torch.uint8).numpy().astype(int) - t.scale.view(torch.uint8).numpy().astype(int))
    assert np.all(step[diff] == 1)
    assert np.all(e4m3_midpoint_between(pre_ours[diff], mt["pre"][diff]))
    # (c) in blocks with equal scales: equal codes, or one grid step apart where the scaled values
    #     (ours: x * (1 / (s_b * g)); torchao: x * ((1 / g) / s_b)) straddle an E2M1 threshold
    c_ours = codes_from_packed(q.packed.numpy())
    c_ao = codes_from_packed(t.qdata.view(torch.uint8).numpy())
    same_scale = np.repeat(s_ours == s_ao, 16, axis=-1)
    cd = (c_ours != c_ao) & same_scale
    assert np.all(e2m1_threshold_between(r["scaled"][cd], mt["scaled"][cd]))
    v_ours, v_ao = grid_value(c_ours[cd]), grid_value(c_ao[cd])
    assert np.all(np.sign(v_ours) * np.sign(v_ao) >= 0)
    assert np.all(np.abs(np.abs(v_ours) - np.abs(v_ao)) <= 2)
    # (d) where parts agree, the dequantized values agree bit for bit
    agree = same_scale & (c_ours == c_ao)
    deq_ours = q.dequantize(torch.float32).numpy()
    deq_ao = t.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(deq_ours[agree], deq_ao[agree])


@given(SEEDS, SHAPES, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.integers(-20, 20), KINDS)
def test_differences_from_modelopt_are_exactly_the_documented_ones(seed, shape, dtype, log2_scale, kind):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 6), -6)
    x = random_input(seed, shape, dtype, log2_scale, kind)
    if float(x.abs().max()) == 0:
        return
    q = nk.quantize(x)
    mq, s, s2 = run_modelopt(x)
    mm = model_modelopt(x)
    r = ref_quantize(x)
    # (a) global scale: one float32 ulp at most
    assert abs(f32_bits(s2) - f32_bits(q.global_scale)) <= 1
    s_ours = q.block_scale.float().numpy()
    s_mo = s.float().numpy()
    amax_b = np.abs(_blocks(x.float().numpy())).max(-1)
    # (b) all-zero blocks: modelopt stores scale 1.0, nvfp4kit 0; both dequantize to 0
    zero = amax_b == 0
    assert np.all(s_mo[zero] == 1.0) and np.all(s_ours[zero] == 0.0)
    # (c) tiny nonzero blocks: modelopt floors the scale at 2^-9 where nvfp4kit may round to 0
    floored = ~zero & (mm["pre"] < 2**-9)
    assert np.all(s_mo[floored] == 2**-9) and np.all(s_ours[floored] <= 2**-9)
    # (d) elsewhere: equal, or one E4M3 step apart across a midpoint of the pre-rounding values
    pre_ours = np.minimum((amax_b * F32(r["s_enc"] * (F32(1) / F32(6)))).astype(np.float32), F32(448))
    diff = (s_ours != s_mo) & ~zero & ~floored
    step = np.abs(q.block_scale.view(torch.uint8).numpy().astype(int) - s.view(torch.uint8).numpy().astype(int))
    assert np.all(step[diff] == 1)
    assert np.all(e4m3_midpoint_between(pre_ours[diff], mm["pre"][diff]))
    # (e) codes, in blocks with equal scales: modelopt writes +0 for -0.0 and for negatives that
    #     round to zero (sign from x < 0 on the scaled value); otherwise equal except one step
    #     across a threshold (true division vs multiplication by a reciprocal; global scale ulp)
    c_ours = codes_from_packed(q.packed.numpy())
    c_mo = codes_from_packed(mq._quantized_data.numpy())
    same_scale = np.repeat(s_ours == s_mo, 16, axis=-1)
    neg_zero = same_scale & (c_ours == 8) & (c_mo == 0)
    assert np.all(mm["scaled"][neg_zero] == 0)
    cd = (c_ours != c_mo) & same_scale & ~neg_zero
    assert np.all(e2m1_threshold_between(r["scaled"][cd], mm["scaled"][cd]))
    assert np.all(np.abs(np.abs(grid_value(c_ours[cd])) - np.abs(grid_value(c_mo[cd]))) <= 2)
    # (f) dequantized values: where codes and scales agree, they differ only through the global scale
    agree = same_scale & (grid_value(c_ours) == grid_value(c_mo))
    deq_ours = q.dequantize(torch.float32).double().numpy()
    deq_mo = modelopt_dequantize(mq, s, s2, torch.float32).double().numpy()
    np.testing.assert_allclose(deq_mo[agree], deq_ours[agree], rtol=2**-22, atol=0)


def test_documented_edge_policies_side_by_side():
    """Zero blocks, a tiny block and -0.0, hand-built: the three libraries' documented choices."""
    x = torch.zeros(3, 32)
    x[0] = torch.linspace(-3, 3, 32)  # sets the tensor amax to 3
    x[1, :16] = 0.0  # all-zero block
    x[1, 16:] = -0.0  # all-negative-zero block
    x[2, :16] = 1e-6  # amax_b * S_enc / 6 ~ 1.5e-4 < 2^-10: below the smallest subnormal scale / 2
    x[2, 16:] = 6e-5  # amax_b * S_enc / 6 ~ 4.6 * 2^-9: a subnormal scale for nvfp4kit, floored by torchao
    q = nk.quantize(x)
    t = run_torchao(x, q.global_scale)
    mq, s, _ = run_modelopt(x)
    assert q.block_scale.float()[1].tolist() == [0.0, 0.0]
    assert t.scale.float()[1].tolist() == [2**-6, 2**-6]
    assert s.float()[1].tolist() == [1.0, 1.0]
    assert float(q.block_scale.float()[2, 0]) == 0.0
    assert float(t.scale.float()[2, 0]) == 2**-6
    assert float(s.float()[2, 0]) == 2**-9
    sub = float(q.block_scale.float()[2, 1])
    assert 0 < sub < 2**-6 and float(t.scale.float()[2, 1]) == 2**-6
    # -0.0: nvfp4kit and torchao copy the sign bit (code 8), modelopt writes +0 (code 0)
    assert (q.packed[1, 8:] == 0x88).all() and (t.qdata.view(torch.uint8)[1, 8:] == 0x88).all()
    assert (mq._quantized_data[1, 8:] == 0).all()
    # everybody dequantizes those blocks to zero
    assert (q.dequantize()[1] == 0).all() and (t.dequantize(torch.float32)[1] == 0).all()
    assert (modelopt_dequantize(mq, s, _)[1] == 0).all()


# ============================================================================= 4. the rare differences do happen


def _amax_with_equal_global_scales() -> np.float32:
    """A tensor amax for which amax / 2688 and 1 / (2688 / amax) are the same float32."""
    for amax in (3.0, 1.0, 5.0, 7.0, 11.0, 13.0, 0.3):
        a = F32(amax)
        if f32_bits(F32(a / F32(2688))) == f32_bits(F32(1) / ref_global_encode(a)):
            return a
    raise AssertionError("no candidate amax with equal global scales")


def _ulp_walk(v: np.float32, k: int) -> np.float32:
    for _ in range(abs(k)):
        v = np.nextafter(v, np.float32(np.inf) if k > 0 else np.float32(-np.inf))
    return v


def _scale_straddlers(g: np.float32, s_enc: np.float32, peer: str) -> list[float]:
    """Block amaxes (float32) near 6 * g * (E4M3 midpoint) where the canonical pre-rounding value
    and the peer's round to different E4M3 values."""
    factor = F32(s_enc * (F32(1) / F32(6)))
    found = []
    for i in range(8, 0x7E):
        mid = (E4M3_POS_VALUES[i] + E4M3_POS_VALUES[i + 1]) / 2
        base = F32(mid * 6 * float(g))
        for k in range(-6, 7):
            a = _ulp_walk(base, k)
            ours = F32(a * factor)
            theirs = F32(F32(a / F32(6)) / g) if peer == "torchao" else F32(a / F32(F32(6) * g))
            if ref_e4m3_bits(ours) != ref_e4m3_bits(theirs):
                found.append(float(a))
    return found


@pytest.mark.parametrize("peer", ["torchao", "modelopt"])
def test_block_scale_differences_occur_and_are_one_e4m3_step(peer):
    amax = _amax_with_equal_global_scales()  # same global scale for all: isolate the block step
    s_enc = ref_global_encode(amax)
    g = F32(1) / s_enc
    amaxes = _scale_straddlers(g, s_enc, peer)
    assert len(amaxes) >= 10  # measured: dozens for this tensor amax
    x = torch.zeros(len(amaxes) + 1, 16)
    x[0, 0] = float(amax)
    x[1:, 3] = torch.tensor(amaxes)
    q = nk.quantize(x)
    if peer == "torchao":
        peer_scale = run_torchao(x, q.global_scale).scale
    else:
        peer_scale = run_modelopt(x)[1]
    a = q.block_scale.view(torch.uint8)[1:, 0].to(torch.int32)
    b = peer_scale.view(torch.uint8)[1:, 0].to(torch.int32)
    assert ((a - b).abs() == 1).all()


@pytest.mark.parametrize("peer", ["torchao", "modelopt"])
def test_code_differences_occur_at_thresholds_and_are_one_step(peer):
    """Same scales, values a few ulps from E2M1 thresholds: the orders round some differently."""
    amax = _amax_with_equal_global_scales()
    s_enc = ref_global_encode(amax)
    g = F32(1) / s_enc
    rows = []
    for sb in (E4M3_POS_VALUES[40], E4M3_POS_VALUES[77], E4M3_POS_VALUES[110]):
        sb = F32(sb)
        # a row whose block amax maps exactly to sb (6 * sb * g, when that reproduces sb)
        top = F32(F32(6) * F32(sb * g))
        for t in E2M1_THRESHOLDS:
            base = F32(t * float(sb) * float(g))
            row = [float(top)] + [float(_ulp_walk(base, k)) for k in range(-7, 8)]
            rows.append(row)
    x = torch.tensor(rows)
    x = torch.cat([torch.full((1, 16), float(amax)), x])
    q = nk.quantize(x)
    if peer == "torchao":
        t = run_torchao(x, q.global_scale)
        peer_scale, peer_packed = t.scale, t.qdata.view(torch.uint8)
    else:
        mq, peer_scale, s2 = run_modelopt(x)
        assert f32_bits(s2) == f32_bits(q.global_scale)
        peer_packed = mq._quantized_data
    assert torch.equal(q.block_scale.view(torch.uint8), peer_scale.view(torch.uint8))
    c_ours = codes_from_packed(q.packed.numpy())
    c_peer = codes_from_packed(peer_packed.numpy())
    diff = c_ours != c_peer
    assert diff.sum() >= 3  # measured: several per threshold sweep
    assert np.all(np.abs(np.abs(grid_value(c_ours[diff])) - np.abs(grid_value(c_peer[diff]))) <= 2)
    r = ref_quantize(x)
    mt = model_torchao(x, q.global_scale) if peer == "torchao" else model_modelopt(x)
    assert np.all(e2m1_threshold_between(r["scaled"][diff], mt["scaled"][diff]))


# ============================================================================= compressed-tensors global scale


def test_compressed_tensors_global_scale_is_our_encode_scale_within_one_ulp():
    """compressed-tensors stores the encode direction, 2688 / amax. It writes it as a Python number
    divided by a tensor, which torch evaluates as 2688 * (1 / amax): two roundings where our S_enc
    has one, so the two agree or differ by one float32 ulp. Where 2688 / amax overflows float32,
    CT falls back to 1 and we clamp to FLT_MAX; amax 0 gives 1 in both."""
    import compressed_tensors.quantization.utils.helpers as helpers
    rng = np.random.default_rng(1)
    amaxes = (rng.uniform(1, 2, 2000) * np.exp2(rng.integers(-100, 100, 2000))).astype(np.float32)
    a = torch.from_numpy(amaxes)
    ct = np.array([float(helpers.generate_gparam(-v.reshape(1), v.reshape(1))) for v in a], dtype=np.float32)
    ours = nk.global_encode_scale(a).numpy()
    model = (F32(2688) * (F32(1) / amaxes)).astype(np.float32)
    np.testing.assert_array_equal(ct.view(np.uint32), model.view(np.uint32))
    ulps = np.abs(ct.view(np.int32).astype(np.int64) - ours.view(np.int32).astype(np.int64))
    assert ulps.max() == 1 and 0.05 < (ulps == 1).mean() < 0.6
    assert torch.equal(nk.decode_from_encode(nk.global_encode_scale(a)), nk.global_decode_scale(a))
    tiny = torch.tensor([1e-40])
    assert float(helpers.generate_gparam(-tiny, tiny)) == 1.0
    assert float(nk.global_encode_scale(tiny[0])) == float(torch.finfo(torch.float32).max)
    zero = torch.zeros(1)
    assert float(helpers.generate_gparam(zero, zero)) == 1.0 == float(nk.global_encode_scale(zero[0]))
