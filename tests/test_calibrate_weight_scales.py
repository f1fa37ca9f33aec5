"""Weight-scale methods: mse never worse than max per block, GPTQ against a dense reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.calibrate.weight_scales import (
    gptq_weight_parts,
    mse_weight_parts,
    nvfp4_weight_parts,
)
from nvfp4kit.formats.nvfp4 import dequantize_parts, quantize_parts
from nvfp4kit.formats.scales import global_encode_scale, nvfp4_block_scale


def _deq(p):
    return dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, torch.float64)


def _block_sq_err(w, w_hat):
    d = (w_hat.double() - w.double()).reshape(w.shape[0], -1, 16)
    return d.square().sum(-1)


@settings(max_examples=40)
@given(
    rows=st.integers(1, 9),
    blocks=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    heavy=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_mse_never_worse_than_max_on_any_block(rows, blocks, seed, heavy, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, blocks * 16, generator=g)
    if heavy:  # outliers make clipping worthwhile
        w = w * torch.where(torch.rand(w.shape, generator=g) < 0.05, 15.0, 1.0)
    w = w.to(dtype)
    p_max = quantize_parts(w)
    p_mse = mse_weight_parts(w)
    assert torch.equal(p_mse.global_decode_scale, p_max.global_decode_scale)
    e_max = _block_sq_err(w, _deq(p_max))
    e_mse = _block_sq_err(w, _deq(p_mse))
    assert bool((e_mse <= e_max).all())


def test_mse_improves_gaussian_weights_and_keeps_zero_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[3, 16:32] = 0.0
    e_max = (_deq(quantize_parts(w)) - w.double()).square().sum()
    p = mse_weight_parts(w)
    e_mse = (_deq(p) - w.double()).square().sum()
    assert e_mse < 0.97 * e_max  # clipping the block max pays off on Gaussian data
    assert float(p.block_scale[3, 1].float()) == 0.0
    assert torch.all(_deq(p)[3, 16:32] == 0)


def test_mse_candidates_are_the_search_space():
    # brute force over every E4M3 scale code for one block: mse must find the best within its offsets
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 16, generator=g) * 3
    p = mse_weight_parts(w, offsets=tuple(range(-126, 127)))
    s_enc = global_encode_scale(w.abs().amax())
    s_dec = 1.0 / s_enc
    best = None
    for code in range(1, 127):
        s = torch.tensor([code], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
        vals = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
        step = s * float(s_dec)
        # nearest grid magnitude, independently of the library's rounding (ties: either is fine here)
        mags = (w.double().abs() / step).clamp(max=6)
        q = vals[(mags.unsqueeze(-1) - vals).abs().argmin(-1)] * step * torch.sign(w.double())
        err = float((q - w.double()).square().sum())
        best = err if best is None else min(best, err)
    got = float((_deq(p) - w.double()).square().sum())
    assert got <= best * (1 + 1e-6)  # float32 scale products vs float64 here


def _reference_gptq(w, H, damp=0.01):
    """Plain float64 OBQ-style loop: explicit inverse-Hessian updates, no Cholesky, no lazy batches."""
    W = w.double().clone()
    N, K = W.shape
    H = H.double().clone()
    d = torch.diagonal(H)
    d[d <= 0] = 1.0
    d += damp * float(d.mean())
    Hinv = torch.linalg.inv(H)
    s_enc = global_encode_scale(w.abs().amax())
    s_dec = (1.0 / s_enc).double()
    vals = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    Q = torch.zeros_like(W)
    for i in range(K):
        if i % 16 == 0:
            s_b = nvfp4_block_scale(W[:, i:i + 16].abs().amax(-1).float(), s_enc).double()
            step = s_b * s_dec
        x = (W[:, i] / step).nan_to_num(0.0)
        mags = x.abs().clamp(max=6)
        q = vals[(mags.unsqueeze(-1) - vals).abs().argmin(-1)] * torch.sign(x) * step
        Q[:, i] = q
        e = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1:] -= e.unsqueeze(1) * Hinv[i, i + 1:].unsqueeze(0)
        # remove row/col i from the inverse (Schur complement)
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


def _correlated(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    # a few latent factors plus a little noise: strongly correlated inputs, as in real layers
    B = torch.randn(k // 4, k, generator=g)
    scales = torch.linspace(0.2, 3.0, k)
    return (torch.randn(n, k // 4, generator=g) @ B + 0.1 * torch.randn(n, k, generator=g)) * scales


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_matches_dense_reference(seed):
    X = _correlated(512, 64, seed).double()
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(24, 64, generator=g, dtype=torch.float64)
    H = X.T @ X
    p = gptq_weight_parts(w, H, lazy_block=32)
    got = _deq(p)
    ref = _reference_gptq(w, H)
    # same algorithm, different algebra (Cholesky vs explicit inverse): values agree up to rare ties
    same = torch.isclose(got, ref, rtol=1e-6, atol=0)
    assert same.double().mean() > 0.995
    out_got = (X @ (w - got).T).norm()
    out_ref = (X @ (w - ref).T).norm()
    assert abs(float(out_got - out_ref)) <= 0.02 * float(out_ref)


@pytest.mark.parametrize("seed", [0, 3])
def test_gptq_reduces_layer_output_error_vs_rtn(seed):
    X = _correlated(1024, 128, seed)
    g = torch.Generator().manual_seed(7 + seed)
    w = torch.randn(48, 128, generator=g)
    H = X.T @ X
    rtn = dequantize_parts(*_parts_tuple(quantize_parts(w)))
    gq = dequantize_parts(*_parts_tuple(gptq_weight_parts(w, H)))
    err_rtn = (X @ (w - rtn).T).norm()
    err_gptq = (X @ (w - gq).T).norm()
    assert err_gptq < 0.85 * err_rtn


def _parts_tuple(p):
    return p.packed, p.block_scale, p.global_decode_scale


def test_gptq_dead_inputs_and_shape_errors():
    X = _correlated(256, 32, 5)
    X[:, 5] = 0.0  # an input that never fires
    w = torch.randn(8, 32)
    p = gptq_weight_parts(w, X.T @ X)
    assert torch.isfinite(_deq(p)).all()
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_weight_parts(w, torch.eye(16))
    with pytest.raises(ValueError, match="needs the calibration Hessian"):
        nvfp4_weight_parts(w, "gptq")
    with pytest.raises(ValueError, match="weight scale method"):
        nvfp4_weight_parts(w, "bogus")


def test_shared_global_amax_is_used_by_every_method():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    shared = float(w.abs().max()) * 3
    X = _correlated(128, 64, 1)
    expect = 1.0 / global_encode_scale(torch.tensor(shared))
    for m in ("max", "mse", "gptq"):
        p = nvfp4_weight_parts(w, m, global_amax=shared, hessian=X.T @ X)
        assert torch.equal(p.global_decode_scale, expect.reshape(())), m
    p46 = nvfp4_weight_parts(w, "4over6", global_amax=shared)
    assert torch.equal(p46.global_decode_scale, (1.0 / global_encode_scale(torch.tensor(shared), 6 * 256)).reshape(()))


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_with_mse_group_scales_beats_max_group_scales(seed):
    X = _correlated(1024, 128, seed)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed))
    H = X.T @ X

    def out_err(p):
        return float((X @ (w - dequantize_parts(*_parts_tuple(p))).T).norm())

    e_max = out_err(gptq_weight_parts(w, H, group_scale="max"))
    e_mse = out_err(gptq_weight_parts(w, H, group_scale="mse"))
    assert e_mse < e_max
    # the method "gptq" is GPTQ with mse group scales
    assert torch.equal(nvfp4_weight_parts(w, "gptq", hessian=H).packed, gptq_weight_parts(w, H, group_scale="mse").packed)
    with pytest.raises(ValueError, match="group_scale"):
        gptq_weight_parts(w, H, group_scale="min")


# ----------------------------------------------------------------------------- the compiled GPTQ step


def _same_parts(a, b):
    return (torch.equal(a.packed, b.packed)
            and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
            and torch.equal(a.global_decode_scale, b.global_decode_scale))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    groups=st.integers(1, 12),
    lazy=st.sampled_from([16, 32, 48, 128]),
    group_scale=st.sampled_from(["max", "mse"]),
    spread=st.floats(1e-6, 1e4),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_gptq_step_is_bit_identical_to_the_torch_loop(rows, groups, lazy, group_scale, spread, seed):
    K = 16 * groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g) * spread
    w[torch.rand(rows, K, generator=g) < 0.1] = 0.0  # zero entries, sometimes whole blocks
    X = _correlated(max(64, K), K, seed % 1000)
    X[:, torch.rand(K, generator=g) < 0.1] = 0.0  # dead inputs
    H = X.T @ X
    ref = gptq_weight_parts(w, H, lazy_block=lazy, group_scale=group_scale, backend="torch")
    got = gptq_weight_parts(w, H, lazy_block=lazy, group_scale=group_scale, backend="compiled")
    assert _same_parts(ref, got)


def test_compiled_gptq_step_edge_cases_and_threads():
    g = torch.Generator().manual_seed(11)
    X = _correlated(512, 256, 4)
    H = X.T @ X
    cases = {
        "zeros": torch.zeros(8, 256),
        "one spike": torch.zeros(8, 256).index_fill_(1, torch.tensor([17]), 3.0),
        "tiny (E4M3 subnormal block scales)": torch.randn(8, 256, generator=g) * 1e-30,
        "huge": torch.randn(8, 256, generator=g) * 1e30,
        "negative zeros": -torch.zeros(8, 256),
    }
    for what, w in cases.items():
        for gs in ("max", "mse"):
            ref = gptq_weight_parts(w, H, group_scale=gs, backend="torch")
            assert _same_parts(ref, gptq_weight_parts(w, H, group_scale=gs, backend="compiled")), (what, gs)
    # rows split over threads: the same bits as one thread
    w = torch.randn(600, 256, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gptq_weight_parts(w, H, group_scale="mse", global_amax=float(w.abs().max()) * 2)
        torch.set_num_threads(3)
        three = gptq_weight_parts(w, H, group_scale="mse", global_amax=float(w.abs().max()) * 2)
    finally:
        torch.set_num_threads(before)
    assert _same_parts(one, three)
    assert _same_parts(one, gptq_weight_parts(w, H, group_scale="mse", global_amax=float(w.abs().max()) * 2,
                                              backend="torch"))


def test_gptq_backend_choice():
    from nvfp4kit.kernels.dispatch import BackendUnavailable, search_kernel

    assert search_kernel(torch.zeros(2, 16), "torch") is None
    assert search_kernel(torch.zeros(2, 16, dtype=torch.float64)) is None  # float64 runs the torch loop
    with pytest.raises(BackendUnavailable, match="float32 CPU"):
        search_kernel(torch.zeros(2, 16, dtype=torch.float64), "compiled")
    with pytest.raises(ValueError, match="backend must be"):
        search_kernel(torch.zeros(2, 16), "fast")


def test_block_errors_sum_in_a_fixed_pairwise_order():
    from nvfp4kit.calibrate.weight_scales import _sum16

    v = torch.tensor([1e16, 1.0, -1e16, 1.0] + [0.0] * 12, dtype=torch.float64)
    # halves added pairwise (8+8, 4+4, 2+2, 1+1), written out by hand
    s8 = [v[j] + v[j + 8] for j in range(8)]
    s4 = [s8[j] + s8[j + 4] for j in range(4)]
    s2 = [s4[j] + s4[j + 2] for j in range(2)]
    assert float(_sum16(v)) == float(s2[0] + s2[1])
    # the big values cancel first (v0 + v2), so both ones survive; left to right would lose one
    assert float(_sum16(v)) == 2.0
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    assert torch.allclose(_sum16(x), x.sum(-1))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 30),
    blocks=st.integers(1, 8),
    spread=st.floats(1e-30, 1e30),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_mse_is_bit_identical_to_the_torch_loop(rows, blocks, spread, shared, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 16 * blocks, generator=g) * torch.rand(rows, 1, generator=g) * spread
    w[torch.rand(w.shape, generator=g) < 0.2] = 0.0
    w = w.to(dtype)
    amax = float(w.abs().max()) * 1.5 if shared else None
    ref = mse_weight_parts(w, amax, rows_per_chunk=7, backend="torch")
    got = mse_weight_parts(w, amax, rows_per_chunk=7, backend="compiled")
    assert _same_parts(ref, got)


def test_compiled_mse_on_a_big_tensor_over_threads():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 700, 64, generator=g)
    assert _same_parts(mse_weight_parts(w, backend="torch"), mse_weight_parts(w, backend="compiled"))


@pytest.mark.parametrize("K", [48, 700, 1100])
def test_gptq_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(K):
    from nvfp4kit.calibrate.weight_scales import gptq_hessian_factor

    X = _correlated(2 * K, K, K).double()
    X[:, 3] = 0.0  # a dead input: unit diagonal before damping
    H = X.T @ X
    U = gptq_hessian_factor(H, damp=0.01, dtype=torch.float64)
    # the independent reference: damp the diagonal, invert explicitly, factor
    Hd = H.clone()
    d = torch.diagonal(Hd)
    d[d <= 0] = 1.0
    d += 0.01 * float(d.mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diagonal(U) > 0).all())
    assert torch.allclose(U, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))
    U32 = gptq_hessian_factor(H.float())
    assert U32.dtype == torch.float32 and torch.allclose(U32.double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_gptq_with_a_given_factor_is_gptq_with_its_hessian():
    from nvfp4kit.calibrate.weight_scales import gptq_hessian_factor

    X = _correlated(256, 64, 9)
    H = X.T @ X
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    a = nvfp4_weight_parts(w, "gptq", hessian=H)
    b = nvfp4_weight_parts(w, "gptq", hessian=H, hessian_factor=gptq_hessian_factor(H))
    assert _same_parts(a, b)
    with pytest.raises(ValueError, match="factor must be"):
        nvfp4_weight_parts(w, "gptq", hessian=H, hessian_factor=gptq_hessian_factor(H).double())


def _reference_gptq_act_order(w, H, damp=0.01):
    """Float64 OBQ loop in decreasing-diag(H) order with every block scale fixed up front (max rule) on
    the original weights: explicit inverse-Hessian (Schur complement) updates, no Cholesky."""
    W = w.double().clone()
    N, K = W.shape
    H = H.double().clone()
    d = torch.diagonal(H)
    d[d <= 0] = 1.0
    d += damp * float(d.mean())
    s_enc = global_encode_scale(w.abs().amax())
    s_dec = (1.0 / s_enc).double()
    step = (nvfp4_block_scale(W.reshape(N, K // 16, 16).abs().amax(-1).float(), s_enc).double() * s_dec)
    step = step.repeat_interleave(16, 1)
    order = sorted(range(K), key=lambda j: (-float(torch.diagonal(H)[j]), j))
    vals = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    left = list(order)
    for i in order:
        x = (W[:, i] / step[:, i]).nan_to_num(0.0)
        q = vals[(x.abs().clamp(max=6).unsqueeze(-1) - vals).abs().argmin(-1)] * torch.sign(x) * step[:, i]
        Q[:, i] = q
        left.remove(i)
        e = (W[:, i] - q) / Hinv[i, i]
        W[:, left] -= e.unsqueeze(1) * Hinv[i, left].unsqueeze(0)
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_activation_order_matches_dense_reference(seed):
    from nvfp4kit.calibrate.weight_scales import gptq_column_order, gptq_factor, gptq_hessian_factor

    X = _correlated(512, 64, seed).double()
    X = X[:, torch.randperm(64, generator=torch.Generator().manual_seed(seed))]  # energy not left to right
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(200 + seed), dtype=torch.float64)
    H = X.T @ X
    perm = gptq_column_order(H)
    assert torch.equal(torch.diagonal(H)[perm], torch.diagonal(H).sort(descending=True).values)
    assert torch.equal(gptq_factor(H, act_order=True, dtype=torch.float64),
                       gptq_hessian_factor(H[perm][:, perm], dtype=torch.float64))
    p = gptq_weight_parts(w, H, lazy_block=32, act_order=True)
    # block scales fixed on the original weights: exactly the max rule's
    assert torch.equal(p.block_scale.view(torch.uint8), quantize_parts(w).block_scale.view(torch.uint8))
    got, ref = _deq(p), _reference_gptq_act_order(w, H)
    same = torch.isclose(got, ref, rtol=1e-6, atol=0)
    assert same.double().mean() > 0.995
    assert abs(float((X @ (w - got).T).norm() - (X @ (w - ref).T).norm())) <= 0.02 * float((X @ (w - ref).T).norm())
    # and it is GPTQ: much better than round to nearest with the same scales on these inputs
    rtn = dequantize_parts(*_parts_tuple(quantize_parts(w)))
    assert (X @ (w - got).T).norm() < 0.85 * (X @ (w - rtn).T).norm()
    # the mse group rule picks the mse method's scales of the original weights
    pm = gptq_weight_parts(w.float(), H, group_scale="mse", act_order=True)
    assert torch.equal(pm.block_scale.view(torch.uint8), mse_weight_parts(w.float()).block_scale.view(torch.uint8))
