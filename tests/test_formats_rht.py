"""Random Hadamard transform: blockwise 16-point, orthonormal, the spec's fixed sign vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_formats_reference import DTYPES

import nvfp4kit as nk
from nvfp4kit.formats import hadamard

SPEC_SIGN = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]  # numerics.md section 4


def ref_matrix(sign=SPEC_SIGN) -> np.ndarray:
    """diag(sign) @ H16 / 4 with the Sylvester Hadamard H[i, j] = (-1)^popcount(i & j)."""
    n = len(sign)
    h = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)])
    return np.diag(np.array(sign, dtype=np.float64)) @ h / np.sqrt(n)


def ref_rht(x: np.ndarray, dim: int, m: np.ndarray) -> np.ndarray:
    """Plain loop over the 16-element groups along dim: y_group = x_group @ m (float64)."""
    xm = np.moveaxis(x.astype(np.float64), dim, -1)
    out = np.empty_like(xm)
    n = m.shape[0]
    for j in range(0, xm.shape[-1], n):
        out[..., j:j + n] = xm[..., j:j + n] @ m
    return np.moveaxis(out, -1, dim)


def test_default_sign_is_the_spec_vector():
    assert list(nk.DEFAULT_RHT_SIGN) == SPEC_SIGN


def test_matrix_is_the_signed_normalised_hadamard_and_orthonormal():
    m = hadamard.rht_matrix()
    np.testing.assert_array_equal(m.double().numpy(), ref_matrix())
    np.testing.assert_array_equal((m.double() @ m.double().t()).numpy(), np.eye(16))
    assert set(m.abs().flatten().tolist()) == {0.25}
    custom = [1, -1] * 8
    np.testing.assert_array_equal(hadamard.rht_matrix(custom).double().numpy(), ref_matrix(custom))
    sign32 = [1, -1, -1, 1] * 8
    m32 = hadamard.rht_matrix(sign32, size=32).double()
    np.testing.assert_allclose((m32 @ m32.t()).numpy(), np.eye(32), atol=1e-12)


@given(st.integers(0, 2**32 - 1), st.tuples(st.integers(1, 3), st.sampled_from([16, 32, 64])),
       st.sampled_from(DTYPES), st.integers(-20, 20))
def test_rht_matches_blockwise_reference(seed, shape, dtype, log2_scale):
    if dtype == torch.float16:
        log2_scale = max(min(log2_scale, 8), -8)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0**log2_scale).to(dtype)
    y = nk.rht(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = ref_rht(x.float().numpy(), -1, ref_matrix())
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@given(st.integers(0, 2**32 - 1), st.integers(0, 2))
def test_rht_along_other_dims(seed, dim):
    shape = [2, 3, 5]
    shape[dim] = 32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y = nk.rht(x, dim=dim)
    np.testing.assert_allclose(y.double().numpy(), ref_rht(x.numpy(), dim, ref_matrix()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nk.rht(x, dim=dim - 3), y, rtol=0, atol=0)


@given(st.integers(0, 2**32 - 1), st.sampled_from([16, 48, 128]))
def test_inverse_undoes_the_transform(seed, k):
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(nk.inverse_rht(nk.rht(x)), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nk.rht(nk.inverse_rht(x)), x, rtol=1e-6, atol=1e-6)
    sign = [(-1) ** (i * 7 % 3) for i in range(16)]
    torch.testing.assert_close(nk.inverse_rht(nk.rht(x, sign=sign), sign=sign), x, rtol=1e-6, atol=1e-6)


@given(st.integers(0, 2**32 - 1), st.sampled_from([16, 64]))
def test_transform_cancels_in_products_along_the_reduction_dim(seed, k):
    """(x H)(y H)^T == x y^T and norms are preserved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, k, generator=g)
    y = torch.randn(6, k, generator=g)
    ref = (x.double() @ y.double().t()).numpy()
    got = (nk.rht(x).double() @ nk.rht(y).double().t()).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    np.testing.assert_allclose(nk.rht(x).double().norm(dim=-1).numpy(), x.double().norm(dim=-1).numpy(), rtol=1e-6)
    # along the token dim, as for the wgrad operands dy^T x: transform dim 0 of both
    dy = torch.randn(k, 5, generator=g)
    xt = torch.randn(k, 7, generator=g)
    ref = (dy.double().t() @ xt.double()).numpy()
    got = (nk.rht(dy, dim=0).double().t() @ nk.rht(xt, dim=0).double()).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_rht_spreads_a_single_outlier_over_its_block():
    x = torch.zeros(2, 32)
    x[0, 5] = 8.0
    y = nk.rht(x)
    assert torch.equal(y[0, :16].abs(), torch.full((16,), 2.0))
    assert (y[0, 16:] == 0).all() and (y[1] == 0).all()


def test_rht_keeps_float64_dtype_as_documented():
    x = torch.randn(2, 16, dtype=torch.float64)
    assert nk.rht(x).dtype == torch.float64
    assert nk.inverse_rht(x).dtype == torch.float64


def test_bad_rht_inputs_raise():
    with pytest.raises(ValueError, match="multiple of 16"):
        nk.rht(torch.randn(2, 24))
    with pytest.raises(ValueError, match="multiple of 16"):
        nk.rht(torch.randn(24, 16), dim=0)
    with pytest.raises(TypeError, match="floating"):
        nk.rht(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="sign"):
        nk.rht(torch.randn(2, 16), sign=[1] * 15)
    with pytest.raises(ValueError, match="sign"):
        nk.rht(torch.randn(2, 16), sign=[1] * 15 + [2])
    with pytest.raises(ValueError, match="power of two"):
        hadamard.hadamard_matrix(12)
