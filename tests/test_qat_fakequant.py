"""FakeQuantLinear: forward bit-identical to the format core, straight-through gradients, exact export."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nvfp4kit
from nvfp4kit.calibrate.qat import FakeQuantLinear, prepare_qat
from nvfp4kit.formats.fp8 import fp8_quantize
from nvfp4kit.formats.nvfp4 import dequantize_parts
from nvfp4kit.kernels.dispatch import fake_quantize as nvfp4_fake_quant


def ref_quant(x, **kw):
    """The format core's plain torch reference, whatever backend the fake-quant modules dispatch to."""
    return nvfp4kit.quantize(x, backend="torch", **kw)


def _linear(n, k, bias, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * scale)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin.to(dtype)


@settings(max_examples=25)
@given(
    n=st.integers(1, 40),
    kb=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    block=st.sampled_from([(1, 16), (16, 16)]),
    rule=st.sampled_from(["max", "4over6"]),
)
def test_weight_fake_quant_equals_format_core(n, kb, seed, log_scale, dtype, block, rule):
    lin = _linear(n, 16 * kb, False, seed, 2.0**log_scale, dtype)
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=False, weight_block=block, weight_scale=rule)
    expected = ref_quant(lin.weight.detach(), block=block, scale_rule=rule).dequantize()
    got = fq.quantized_weight_value()
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@settings(max_examples=25)
@given(
    n=st.integers(1, 24),
    kb=st.integers(1, 3),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    amax_factor=st.floats(0.3, 2.0),
    bias=st.booleans(),
)
def test_w4a4_forward_is_exact(n, kb, tokens, seed, amax_factor, bias):
    k = 16 * kb
    lin = _linear(n, k, bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, tokens, k, generator=g)
    in_amax = float(x.abs().max()) * amax_factor  # below 1: some inputs saturate, as deployed
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=True, input_amax=in_amax)
    xq = ref_quant(x, global_amax=torch.tensor(in_amax)).dequantize()
    wq = ref_quant(lin.weight.detach()).dequantize()
    assert torch.equal(fq(x), F.linear(xq, wq, lin.bias))
    # weight-only: the input passes unchanged
    fq16 = FakeQuantLinear(lin, "nvfp4", quantize_input=False)
    assert torch.equal(fq16(x), F.linear(x, wq, lin.bias))


def test_ste_gradients_and_clipping():
    lin = _linear(8, 32, True, 0)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    x[0, :4] = torch.tensor([9.0, -9.0, 0.5, -0.5])
    in_amax = 4.0  # the two +-9 entries saturate
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=True, input_amax=in_amax)
    xr = x.clone().requires_grad_(True)
    y = fq(xr)
    dy = torch.randn_like(y, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    xq = ref_quant(x, global_amax=torch.tensor(in_amax)).dequantize()
    wq = ref_quant(lin.weight.detach()).dequantize()
    # weight: identity STE, so dL/dW = dy^T xq; bias: dy summed
    assert torch.allclose(lin.weight.grad, dy.t() @ xq, rtol=1e-6, atol=1e-6)
    assert torch.allclose(lin.bias.grad, dy.sum(0))
    # input: clipped STE, gradient zero where |x| > amax
    expected_dx = (dy @ wq) * (x.abs() <= in_amax)
    assert torch.allclose(xr.grad, expected_dx, rtol=1e-6, atol=1e-6)
    assert float(xr.grad[0, 0]) == 0.0 and float(xr.grad[0, 1]) == 0.0
    assert float(xr.grad[0, 2]) != 0.0


def test_fixed_weight_amax_saturates_and_clips_gradient():
    lin = _linear(4, 16, False, 1)
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=False, weight_amax="fixed")
    amax0 = float(fq.fixed_weight_amax)
    with torch.no_grad():
        lin.weight[0, 0] = 3 * amax0  # grows past the frozen amax
    got = fq.quantized_weight_value()
    expected = ref_quant(lin.weight.detach(), global_amax=torch.tensor(amax0)).dequantize()
    assert torch.equal(got, expected)
    assert float(got[0, 0]) == pytest.approx(amax0, rel=1e-6)  # saturated at the amax (6 * 448 * g)
    fq(torch.randn(3, 16)).sum().backward()
    assert float(lin.weight.grad[0, 0]) == 0.0
    assert bool((lin.weight.grad[1:] != 0).any())


def test_cache_follows_in_place_updates():
    lin = _linear(16, 16, False, 2)
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=False)
    before = fq.quantized_weight_value().clone()
    with torch.no_grad():
        lin.weight.mul_(0.5).add_(0.01)
    after = fq.quantized_weight_value()
    assert not torch.equal(before, after)
    assert torch.equal(after, ref_quant(lin.weight.detach()).dequantize())


def _e4m3_grid() -> torch.Tensor:
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(vals[torch.isfinite(vals)])


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 200), log_scale=st.floats(-10, 10),
       amax_factor=st.floats(0.2, 3.0))
def test_fp8_quantize_is_nearest_e4m3(seed, size, log_scale, amax_factor):
    x = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    amax = float(x.abs().max()) * amax_factor
    q, s_dec = fp8_quantize(x, amax)
    assert q.dtype == torch.float8_e4m3fn and s_dec.dtype == torch.float32 and s_dec.ndim == 0
    # independent reference: float64 nearest point of the E4M3 grid, ties to the even code
    assert float(s_dec) == float(torch.tensor(amax / 448, dtype=torch.float32))  # a Python float amax is float64
    v = (x / s_dec).double().clamp(-448, 448)
    grid = _e4m3_grid()
    dist = (v.unsqueeze(-1) - grid).abs()
    best = dist.min(-1).values
    qd = q.double()
    assert torch.equal((qd - v).abs(), best)
    codes = q.view(torch.uint8)
    tie = ((dist == best.unsqueeze(-1)).sum(-1) > 1) & (best > 0)
    assert bool(((codes[tie] & 1) == 0).all())


def test_fp8_fake_quant_layer_matches_record():
    lin = _linear(8, 24, False, 5)  # K not a multiple of 16 is fine for FP8
    fq = FakeQuantLinear(lin, "fp8", quantize_input=True, input_amax=3.0)
    rec = fq.to_record()
    assert rec.format == "fp8" and rec.input_amax == 3.0
    assert torch.equal(rec.fp8_weight.float() * rec.fp8_weight_scale, fq.quantized_weight_value())
    x = torch.randn(4, 24)
    q, s = fp8_quantize(x, 3.0)
    assert torch.equal(fq(x), F.linear(q.float() * s, fq.quantized_weight_value()))


def test_export_record_is_what_forward_used_after_training():
    lin = _linear(32, 48, True, 6)
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=True, input_amax=2.5, name="layer")
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        fq(torch.randn(6, 48)).square().mean().backward()
        opt.step()
    rec = fq.to_record()
    p = rec.nvfp4
    assert rec.format == "nvfp4" and rec.shape == (32, 48) and rec.input_amax == 2.5
    w_export = dequantize_parts(p.packed, p.block_scale, p.global_decode_scale)
    assert torch.equal(w_export, fq.quantized_weight_value())
    ref = ref_quant(lin.weight.detach())
    assert torch.equal(p.packed, ref.packed) and torch.equal(p.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert float(p.global_decode_scale) == float(ref.global_scale)
    assert torch.equal(rec.bias, lin.bias.detach())


def test_bad_inputs_name_the_module():
    with pytest.raises(ValueError, match="odd.*multiple of 16"):
        FakeQuantLinear(nn.Linear(20, 8), "nvfp4", name="odd")
    with pytest.raises(ValueError, match="format"):
        FakeQuantLinear(nn.Linear(16, 8), "int4")
    fq = FakeQuantLinear(nn.Linear(16, 8), "nvfp4", quantize_input=True, name="noamax")
    with pytest.raises(RuntimeError, match="noamax.*calibrat"):
        fq(torch.randn(2, 16))
    with pytest.raises(ValueError, match="noamax"):
        fq.to_record()
    with pytest.raises(ValueError, match="NaN"):
        nvfp4_fake_quant(torch.tensor([float("nan")] * 16))


def test_fused_group_shares_global_scale():
    parent = nn.Module()
    parent.attn = nn.Module()
    for name, n, s in (("q_proj", 32, 1.0), ("k_proj", 16, 5.0), ("v_proj", 16, 0.1)):
        setattr(parent.attn, name, _linear(n, 32, False, len(name) + n, s))
    parent.attn.o_proj = _linear(32, 32, False, 9, 0.5)
    mods = prepare_qat(parent, "nvfp4", quantize_input=False, exclude=())
    recs = {n: m.to_record() for n, m in mods.items()}
    amax = max(float(parent.attn.get_submodule(n).weight.detach().abs().max()) for n in ("q_proj", "k_proj", "v_proj"))
    expected = float(nvfp4kit.global_decode_scale(torch.tensor(amax)))
    for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        assert float(recs[n].nvfp4.global_decode_scale) == expected
        assert torch.equal(mods[n].quantized_weight_value(),
                           ref_quant(mods[n].weight.detach(), global_amax=torch.tensor(amax)).dequantize())
    own = float(nvfp4kit.global_decode_scale(parent.attn.o_proj.weight.detach().abs().max()))
    assert float(recs["attn.o_proj"].nvfp4.global_decode_scale) == own
    assert not math.isnan(own)


def test_mse_weight_scale_matches_ptq_method_and_exports_it():
    from nvfp4kit.calibrate.weight_scales import mse_weight_parts

    lin = _linear(24, 64, False, 8)
    fq = FakeQuantLinear(lin, "nvfp4", quantize_input=False, weight_scale="mse")
    ref = mse_weight_parts(lin.weight.detach())
    rec = fq.to_record().nvfp4
    assert torch.equal(rec.packed, ref.packed)
    assert torch.equal(rec.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert torch.equal(fq.quantized_weight_value(), dequantize_parts(ref.packed, ref.block_scale, ref.global_decode_scale))
    with pytest.raises(ValueError, match="1x16"):
        FakeQuantLinear(lin, "nvfp4", weight_scale="mse", weight_block=(16, 16))


def test_evaluation_emulation_reproduces_the_trained_forward():
    from nvfp4kit.calibrate import emulation

    for fmt in ("nvfp4", "fp8"):
        lin = _linear(16, 32, True, 9)
        fq = FakeQuantLinear(lin, fmt, quantize_input=True, input_amax=1.7)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(10))
        emu = emulation.EmulatedLinear(fq.to_record())
        assert torch.equal(emu(x), fq(x))


def test_fused_siblings_quantize_a_shared_input_once_and_exactly():
    parent = nn.Module()
    for name in ("gate_proj", "up_proj"):
        setattr(parent, name, _linear(32, 32, False, len(name)))
    mods = prepare_qat(parent, "nvfp4", quantize_input=True, exclude=())
    for m in mods.values():
        m.input_amax.fill_(2.0)
    calls = []
    import nvfp4kit.calibrate.qat.linear as qat

    real = qat.fake_quantize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    qat.fake_quantize = counting
    try:
        x = torch.randn(4, 32)
        ya, yb = parent.gate_proj(x), parent.up_proj(x)
        assert len(calls) == 1  # the second sibling reused the first one's quantized input
        x.mul_(2)  # modified in place: must be quantized again
        yc = parent.up_proj(x)
        assert len(calls) == 2
        parent.gate_proj(x.clone())
        assert len(calls) == 3
    finally:
        qat.fake_quantize = real
    xq = ref_quant(x / 2, global_amax=torch.tensor(2.0)).dequantize()
    assert torch.equal(ya, F.linear(xq, mods["gate_proj"].quantized_weight_value()))
    assert torch.equal(yb, F.linear(xq, mods["up_proj"].quantized_weight_value()))
    xq2 = ref_quant(x, global_amax=torch.tensor(2.0)).dequantize()
    assert torch.equal(yc, F.linear(xq2, mods["up_proj"].quantized_weight_value()))
