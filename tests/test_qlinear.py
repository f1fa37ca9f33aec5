"""The emulated quantized linears against a hand-written reference of the recipe.

The reference quantizer below is written from the formulas in numerics.md (grid search for the
nearest E2M1 value with ties to the even code, explicit neighbour choice for stochastic rounding,
a Sylvester Hadamard built here), independently of nvfp4kit.formats. Inputs are small integers
times powers of two, so the Hadamard sums are exact in float32 and every quantization decision of
the reference and of the code under test sees the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nvfp4kit.formats import dequantize_parts, quantize_parts
from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.training.qlinear import quantized_linear
from nvfp4kit.training.qlinear import emulated_linear

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
TE_SIGN = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]


def ref_round_nearest(a: float) -> float:
    """Nearest grid magnitude; on a tie the even code (index 0, 2, 4, 6) wins."""
    best = None
    for i, g in enumerate(GRID):
        d = abs(a - g)
        if best is None or d < best[0] or (d == best[0] and i % 2 == 0):
            best = (d, i, g)
    return best[2]


def ref_round_stochastic(a: float, u: float) -> float:
    if a >= 6.0:
        return 6.0
    lo = max(g for g in GRID if g <= a)
    hi = GRID[GRID.index(lo) + 1]
    return hi if u < (a - lo) / (hi - lo) else lo


def ref_fake_quant(x: torch.Tensor, tile_rows: int = 1, u: torch.Tensor | None = None, range_max=2688.0,
                   four_over_six=False) -> torch.Tensor:
    """NVFP4 quantize-dequantize of a 2D tensor, blocks of ``tile_rows`` x 16, in float32 scalar steps."""
    x = x.float()
    M, K = x.shape
    amax = x.abs().max()
    s_enc = torch.tensor(range_max, dtype=torch.float32) / amax if amax > 0 else torch.tensor(1.0)
    s_dec = torch.tensor(1.0) / s_enc
    inv6 = torch.tensor(1.0) / torch.tensor(6.0)
    out = torch.zeros(M, K)
    for r0 in range(0, M, tile_rows):
        for c0 in range(0, K, 16):
            tile = x[r0:r0 + tile_rows, c0:c0 + 16]
            bamax = tile.abs().max()
            cands = [bamax, bamax * 1.5] if four_over_six else [bamax]
            best = None
            for cand in cands:
                s_b = torch.clamp(cand * (s_enc * inv6), max=448.0).to(torch.float8_e4m3fn).float()
                denom = s_b * s_dec
                enc = torch.tensor(1.0) / denom if denom > 0 else torch.tensor(float("inf"))
                enc = torch.clamp(enc, max=torch.finfo(torch.float32).max)
                deq = torch.zeros_like(tile)
                for i in range(tile.shape[0]):
                    for j in range(tile.shape[1]):
                        v = float(torch.clamp(tile[i, j].detach() * enc, -6, 6))
                        if u is None:
                            m = ref_round_nearest(abs(v))
                        else:
                            m = ref_round_stochastic(abs(v), float(u[r0 + i, c0 + j]))
                        deq[i, j] = (m if v >= 0 else -m) * float(s_b * s_dec)
                err = float((deq - tile).double().square().sum())
                if best is None or err < best[0]:
                    best = (err, deq)
            out[r0:r0 + tile_rows, c0:c0 + 16] = best[1]
    return out


def ref_rht_rows(t: torch.Tensor, sign=TE_SIGN) -> torch.Tensor:
    """Blockwise 16-point RHT along the last dim (float64), H = diag(sign) Hadamard / 4."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    H = torch.tensor(sign, dtype=torch.float64).unsqueeze(1) * h / 4
    M, T = t.shape
    return (t.double().reshape(M, T // 16, 16) @ H).reshape(M, T).float()


def grid_tensor(shape, gen, scale_pow=0):
    """Small integers times a power of two: exact under the 16-point Hadamard in float32."""
    return torch.randint(-48, 49, shape, generator=gen).float() * 2.0**scale_pow


def ref_recipe(x, w, dy, p: LinearPrecision, seed: int):
    """The recipe written out: returns y, dx, dw (float64)."""
    T = x.shape[0]
    wq = ref_fake_quant(w, 16 if p.weight_2d else 1, four_over_six=p.four_over_six,
                        range_max=6 * 256.0 if p.four_over_six else 2688.0)
    y = ref_fake_quant(x).double() @ wq.double().t()
    torch.manual_seed(seed)
    u_dy = torch.rand(dy.shape) if p.stochastic_rounding else None
    dyq = ref_fake_quant(dy, u=u_dy)
    wt = wq if p.weight_2d else ref_fake_quant(w.t().contiguous()).t()
    dx = dyq.double() @ wt.double()
    Tp = -(-T // 16) * 16
    dy_t = torch.zeros(dy.shape[1], Tp)
    dy_t[:, :T] = dy.t()
    x_t = torch.zeros(x.shape[1], Tp)
    x_t[:, :T] = x.t()
    if p.rht:
        dy_t, x_t = ref_rht_rows(dy_t, p.rht_sign or TE_SIGN), ref_rht_rows(x_t, p.rht_sign or TE_SIGN)
    u_w = torch.rand(dy_t.shape) if p.stochastic_rounding else None
    dw = ref_fake_quant(dy_t, u=u_w).double() @ ref_fake_quant(x_t).double().t()
    return y, dx, dw


def run_impl(x, w, dy, p, seed, dtype=torch.float32):
    xi = x.detach().clone().to(dtype).requires_grad_(True)
    wi = w.clone().requires_grad_(True)
    y = quantized_linear(xi, wi, None, p)
    torch.manual_seed(seed)
    y.backward(dy.to(y.dtype))
    return y, xi.grad, wi.grad


def close(a, b, rel=2e-6):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / scale) <= rel


@given(
    T=st.integers(1, 40),
    K=st.sampled_from([16, 32, 48]),
    N=st.sampled_from([16, 32]),
    weight_2d=st.booleans(),
    rht=st.booleans(),
    sr=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nvfp4_recipe_matches_reference(T, K, N, weight_2d, rht, sr, seed):
    g = torch.Generator().manual_seed(seed)
    x = grid_tensor((T, K), g, -3)
    w = grid_tensor((N, K), g, -6)
    dy = grid_tensor((T, N), g, -8)
    p = LinearPrecision("nvfp4", weight_2d=weight_2d, rht=rht, stochastic_rounding=sr)
    y, dx, dw = run_impl(x, w, dy, p, seed)
    ry, rdx, rdw = ref_recipe(x, w, dy, p, seed)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    assert close(y, ry), "fprop"
    assert close(dx, rdx), "dgrad"
    assert close(dw, rdw), "wgrad"


def test_four_over_six_weights_and_custom_sign():
    g = torch.Generator().manual_seed(3)
    x, w, dy = grid_tensor((20, 32), g, -3), grid_tensor((32, 32), g, -6), grid_tensor((20, 32), g, -8)
    sign = tuple(-s for s in TE_SIGN)
    p = LinearPrecision("nvfp4", four_over_six=True, rht_sign=sign, stochastic_rounding=False)
    y, dx, dw = run_impl(x, w, dy, p, 0)
    ry, rdx, rdw = ref_recipe(x, w, dy, p, 0)
    assert close(y, ry) and close(dx, rdx) and close(dw, rdw)
    # the switch changes the numbers
    y6, _, _ = run_impl(x, w, dy, LinearPrecision("nvfp4", stochastic_rounding=False), 0)
    assert not torch.equal(y, y6)


def test_gemm_equals_dequantize_then_fp32_matmul():
    """fprop == dequantize(Q(x)) @ dequantize(Q2d(W))^T in float32 (random normal data, bf16 input)."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64).bfloat16()
    w = torch.randn(48, 64)
    y = emulated_linear(x, w, None, LinearPrecision("nvfp4"))
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    qx = quantize_parts(x.reshape(-1, 64))
    qw = quantize_parts(w, block=(16, 16))
    ref = dequantize_parts(qx.packed, qx.block_scale, qx.global_decode_scale) @ dequantize_parts(
        qw.packed, qw.block_scale, qw.global_decode_scale).t()
    assert torch.equal(y.reshape(-1, 48), ref.bfloat16())


def test_bias_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    x = grid_tensor((2, 5, 32), g, -3).requires_grad_(True)
    w = grid_tensor((16, 32), g, -5).requires_grad_(True)
    b = torch.randn(16, generator=g).requires_grad_(True)
    p = LinearPrecision("nvfp4", stochastic_rounding=False)
    y = quantized_linear(x, w, b, p)
    y0 = quantized_linear(x, w, None, p)
    assert torch.equal(y, y0 + b)
    dy = torch.randn(2, 5, 16, generator=g)
    y.backward(dy)
    assert torch.allclose(b.grad, dy.sum((0, 1)))


def test_autocast_gives_the_same_numbers_in_bf16():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 32, generator=g)
    w = torch.randn(32, 32, generator=g)
    p = LinearPrecision("nvfp4", stochastic_rounding=False)
    y32 = quantized_linear(x, w, None, p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yac = quantized_linear(x, w, None, p)
    assert yac.dtype == torch.bfloat16
    assert torch.equal(yac, y32.bfloat16())


def test_stochastic_rounding_gradients_are_unbiased():
    """dgrad with SR: the mean over many draws approaches dy @ Q2d(W) (no rounding of dy at all).

    dy is the same 16 rows repeated 256 times: every copy is quantized with the same global amax
    and its own random draws, so the copies of dx are independent samples."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    dy = torch.randn(16, 16)
    reps = 256
    x = torch.randn(16 * reps, 32, requires_grad=True)
    y = quantized_linear(x, w, None, LinearPrecision("nvfp4", rht=False))
    y.backward(dy.repeat(reps, 1))
    samples = x.grad.double().reshape(reps, 16, 32)
    exact = dy.double() @ ref_fake_quant(w, 16).double()
    err_mean = float((samples.mean(0) - exact).norm() / exact.norm())
    err_one = float((samples[0] - exact).norm() / exact.norm())
    assert err_one > 0.03  # one draw is a rounding step away
    assert err_mean < err_one / 6  # ~1/sqrt(256) of it if unbiased


def test_switches_change_the_right_gemm():
    g = torch.Generator().manual_seed(4)
    x, w, dy = grid_tensor((32, 32), g, -3), grid_tensor((32, 32), g, -6), grid_tensor((32, 32), g, -8)
    base = LinearPrecision("nvfp4", stochastic_rounding=False)
    y, dx, dw = run_impl(x, w, dy, base, 0)
    y2, dx2, dw2 = run_impl(x, w, dy, LinearPrecision("nvfp4", stochastic_rounding=False, rht=False), 0)
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and not torch.equal(dw, dw2)
    y3, dx3, dw3 = run_impl(x, w, dy, LinearPrecision("nvfp4", stochastic_rounding=False, weight_2d=False), 0)
    assert not torch.equal(y, y3) and torch.equal(dw, dw3)


def _ref_mxfp8(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    M, K = t.shape
    out = torch.zeros_like(t)
    for r in range(M):
        for c0 in range(0, K, 32):
            blk = t[r, c0:c0 + 32]
            amax = float(blk.abs().max())
            e = math.ceil(math.log2(amax / 448.0)) if amax > 0 else -127
            e = max(-127, min(127, e))
            out[r, c0:c0 + 32] = (blk / 2.0**e).float().clamp(-448, 448).to(torch.float8_e4m3fn).double() * 2.0**e
    return out


def test_mxfp8_linear_matches_reference():
    g = torch.Generator().manual_seed(5)
    T, K, N = 40, 64, 32
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g)
    dy = torch.randn(T, N, generator=g)
    y, dx, dw = run_impl(x, w, dy, LinearPrecision("mxfp8"), 0)
    assert close(y, _ref_mxfp8(x) @ _ref_mxfp8(w).t(), 1e-5)
    assert close(dx, _ref_mxfp8(dy) @ _ref_mxfp8(w.t().contiguous()).t(), 1e-5)
    pad = torch.zeros(N, 64)
    pad[:, :T] = dy.t()
    padx = torch.zeros(K, 64)
    padx[:, :T] = x.t()
    assert close(dw, _ref_mxfp8(pad) @ _ref_mxfp8(padx).t(), 1e-5)


def test_fp8_linear_matches_reference():
    g = torch.Generator().manual_seed(6)
    x, w, dy = torch.randn(10, 24, generator=g), torch.randn(8, 24, generator=g), torch.randn(10, 8, generator=g)

    def q(t):
        s = 448.0 / t.abs().max()
        return (t * s).clamp(-448, 448).to(torch.float8_e4m3fn).double() / s.double()

    y, dx, dw = run_impl(x, w, dy, LinearPrecision("fp8"), 0)
    assert close(y, q(x) @ q(w).t(), 1e-5)
    assert close(dx, q(dy) @ q(w), 1e-5)
    assert close(dw, q(dy).t() @ q(x), 1e-5)


def test_bf16_is_plain_linear_and_bad_shapes_are_named():
    x, w = torch.randn(4, 24), torch.randn(8, 24)
    assert torch.equal(quantized_linear(x, w, None, "bf16"), x @ w.t())
    with pytest.raises(ValueError, match="in_features 24"):
        quantized_linear(x, w, None, LinearPrecision("nvfp4"))
    with pytest.raises(ValueError, match="does not match weight"):
        quantized_linear(torch.randn(4, 32), w, None, LinearPrecision("nvfp4"))
    with pytest.raises(ValueError, match="rht_size"):
        xx = torch.randn(4, 32, requires_grad=True)
        quantized_linear(xx, torch.randn(16, 32, requires_grad=True), None,
                         LinearPrecision("nvfp4", rht_size=8)).sum().backward()
    with pytest.raises(ValueError, match="NaN"):
        quantized_linear(torch.full((4, 32), float("nan")), torch.randn(16, 32), None, LinearPrecision("nvfp4"))


def test_operand_values_equal_block_values_and_backends_agree():
    from nvfp4kit.formats.nvfp4 import block_values
    from nvfp4kit.training.qlinear import operand_values

    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 96, generator=g) * 3
    for block in ((1, 16), (16, 16)):
        q = quantize_parts(x, block=block)
        assert torch.equal(operand_values(q), block_values(q))
    # the linear's numbers do not depend on the quantization backend
    w = torch.randn(32, 96, generator=g)
    p = LinearPrecision("nvfp4", stochastic_rounding=False)
    import nvfp4kit.training.qlinear as ql

    y_fast = quantized_linear(x, w, None, p)
    ql._backend_for.cache_clear()
    orig = ql.backend_available
    try:
        ql.backend_available = lambda name, device="cpu": (False, "off for this test")
        y_ref = quantized_linear(x, w, None, p)
        assert ql._backend_for("cpu") == "auto"
    finally:
        ql.backend_available = orig
        ql._backend_for.cache_clear()
    assert torch.equal(y_fast, y_ref)


def test_wgrad_rht_equals_the_format_core_rht():
    from nvfp4kit.formats.hadamard import rht
    from nvfp4kit.training.qlinear import wgrad_operands

    g = torch.Generator().manual_seed(8)
    dy, x = torch.randn(40, 32, generator=g), torch.randn(40, 48, generator=g).bfloat16()
    p = LinearPrecision("nvfp4", stochastic_rounding=False)
    q_dy, q_x = wgrad_operands(dy, x, p)
    pad = lambda t: torch.cat([t.float(), torch.zeros(8, t.shape[1])]).t()  # noqa: E731
    for q, t in ((q_dy, dy), (q_x, x)):
        ref = quantize_parts(rht(pad(t), dim=-1))
        assert torch.equal(q.packed, ref.packed) and torch.equal(q.block_scale.view(torch.uint8),
                                                                 ref.block_scale.view(torch.uint8))
        assert torch.equal(q.global_decode_scale, ref.global_decode_scale)
