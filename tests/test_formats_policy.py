"""The bad-input policy documented in nvfp4kit/formats/nvfp4.py, case by case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_formats_reference import DTYPES, assert_matches_ref, ref_quantize

import nvfp4kit as nk

FLT_MAX = torch.finfo(torch.float32).max
BLOCKS = [(1, 16), (16, 16)]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_float_dtypes_raise_type_error(dtype):
    x = torch.ones(2, 16).to(dtype)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        nk.quantize(x)


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        nk.quantize(np.ones((2, 16), dtype=np.float32))


@pytest.mark.parametrize("K", [1, 8, 15, 17, 24, 33])
@pytest.mark.parametrize("block", BLOCKS)
def test_last_dim_not_multiple_of_16_raises(K, block):
    with pytest.raises(ValueError, match=r"multiple of 16.*\(16, " + str(K) + r"\)"):
        nk.quantize(torch.ones(16, K), block=block)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nan_and_inf_raise(bad, dtype, block, rounding):
    x = torch.randn(16, 32).to(dtype)
    x[3, 7] = bad
    with pytest.raises(ValueError, match="NaN.*inf"):
        nk.quantize(x, block=block, rounding=rounding)


def test_float64_beyond_float32_range_raises():
    x = torch.ones(2, 16, dtype=torch.float64)
    x[1, 3] = 1e39
    with pytest.raises(ValueError, match="float32 range"):
        nk.quantize(x)
    x[1, 3] = -1e300
    with pytest.raises(ValueError, match="float32 range"):
        nk.quantize(x)


def test_float64_within_range_quantizes_like_its_float32_rounding():
    x = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = nk.quantize(x)
    assert_matches_ref(q, ref_quantize(x.float()))
    assert q.dequantize().dtype == torch.float32


@pytest.mark.parametrize("block", BLOCKS)
def test_values_at_float32_max_stay_finite(block):
    x = torch.ones(16, 32)
    x[0, 0] = FLT_MAX
    x[5, 20] = -FLT_MAX / 3
    q = nk.quantize(x, block=block)
    assert_matches_ref(q, ref_quantize(x, block=block))
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    assert float(deq[0, 0]) == pytest.approx(FLT_MAX, rel=2**-20)


@pytest.mark.parametrize("shape", [(0, 16), (3, 0), (0, 0, 32), (2, 0, 16)])
@pytest.mark.parametrize("block", BLOCKS)
def test_empty_tensors(shape, block):
    if block == (16, 16) and len(shape) < 2:
        pytest.skip("2D blocks need two dims")
    x = torch.empty(shape)
    q = nk.quantize(x, block=block)
    assert q.shape == x.shape
    assert q.packed.shape == (*shape[:-1], shape[-1] // 2)
    assert q.block_scale.shape == (*shape[:-1], shape[-1] // 16)
    assert q.dequantize().shape == x.shape
    assert float(q.global_scale) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_all_zero_tensor(dtype, block):
    x = torch.zeros(32, 64, dtype=dtype)
    q = nk.quantize(x, block=block)
    assert (q.packed == 0).all()
    assert (q.block_scale.float() == 0).all()
    assert float(q.global_scale) == 1.0  # amax 0 -> S_enc = 1
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("block", BLOCKS)
def test_all_zero_blocks_inside_a_tensor(block):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[:16, 16:32] = 0.0
    q = nk.quantize(x, block=block)
    assert (q.block_scale[:16, 1].float() == 0).all()
    assert (q.packed[:16, 8:16] == 0).all()
    assert (q.dequantize()[:16, 16:32] == 0).all()
    assert_matches_ref(q, ref_quantize(x, block=block))
    # negative zeros keep their sign bit (code 8) and still dequantize to zero
    x[:16, 16:32] = -0.0
    qn = nk.quantize(x, block=block)
    assert (qn.packed[:16, 8:16] == 0x88).all()
    assert (qn.dequantize()[:16, 16:32] == 0).all()


@pytest.mark.parametrize("block", BLOCKS)
def test_global_amax_smaller_than_data_saturates(block):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 10
    limit = float(x.abs().max()) / 8
    q = nk.quantize(x, block=block, global_amax=limit)
    assert float(q.block_scale.float().max()) == 448.0
    deq = q.dequantize()
    # the largest representable magnitude is 6 * 448 * (1 / S_enc) = the given amax (one rounding)
    assert float(deq.abs().max()) == pytest.approx(limit, rel=2**-22)
    big = x.abs() >= limit
    assert torch.equal(deq[big].abs(), torch.full_like(deq[big], float(deq.abs().max())))
    assert torch.equal(torch.sign(deq[big]), torch.sign(x[big]))
    assert_matches_ref(q, ref_quantize(x, block=block, global_amax=limit))


@pytest.mark.parametrize("amax", [float("nan"), float("inf"), -1.0])
def test_bad_global_amax_raises(amax):
    with pytest.raises(ValueError, match="global_amax"):
        nk.quantize(torch.ones(2, 16), global_amax=amax)


def test_bad_options_raise():
    x = torch.ones(16, 16)
    with pytest.raises(ValueError, match="block"):
        nk.quantize(x, block=(8, 8))
    with pytest.raises(ValueError, match="rounding"):
        nk.quantize(x, rounding="up")
    with pytest.raises(ValueError, match="scale_rule"):
        nk.quantize(x, scale_rule="min")
    with pytest.raises(ValueError, match="0-dim"):
        nk.quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least 2 dims"):
        nk.quantize(torch.ones(32), block=(16, 16))
    with pytest.raises(ValueError, match="backend"):
        nk.quantize(x, backend="fastest")


@pytest.mark.parametrize("amax", [1e-30, 1e-36, 1e-38, 1e-40, 1e-44])
def test_tiny_tensors_follow_the_canonical_order(amax):
    """Tensors near and below the float32 normal range: S_enc clamps at FLT_MAX; the result is what
    the canonical formula gives (tensors whose amax is deep in the subnormals quantize to zero)."""
    x = torch.linspace(-1, 1, 32).reshape(2, 16) * amax
    q = nk.quantize(x)
    assert_matches_ref(q, ref_quantize(x))
    assert torch.isfinite(q.dequantize()).all()


def test_errors_name_the_tensor_when_told():
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.up_proj\.weight: last dim"):
        nk.quantize(torch.randn(4, 20), name="model.layers.0.mlp.up_proj.weight")
    bad = torch.randn(2, 16)
    bad[1, 3] = float("nan")
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match=r"^act: contains NaN"):
            nk.quantize(bad, name="act", backend=backend)
