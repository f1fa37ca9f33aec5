"""Per-input-channel smoothing (nvfp4kit.calibrate.smoothing): exact folding, the scale formulas, the
AWQ search's guarantees and gains, and its errors.

References are written here independently of the module: a 5-line RMSNorm, attention with explicit
per-head loops (query head h reads kv head h // n_rep), the quantization error assembled from
``fake_quantize`` directly, and the scale formulas evaluated by hand with ``math``.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.calibrate.smoothing import (
    awq_scales,
    awq_search,
    expand_kv_scales,
    fold_into_linear,
    fold_into_norm,
    fold_into_v_proj,
    kv_scales,
    smoothing_error,
    smoothquant_scales,
    tie_gqa_scales,
    weight_block_mean,
)
from nvfp4kit.formats.scales import tensor_amax
from nvfp4kit.kernels.dispatch import fake_quantize

pytestmark = pytest.mark.usefixtures("single_thread")

D64 = torch.float64


def rmsnorm(x, g, eps=1e-6):
    """Reference RMSNorm: g * x / rms(x)."""
    return g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def linear(n_in, n_out, gen, bias=True):
    lin = torch.nn.Linear(n_in, n_out, bias=bias, dtype=D64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=D64))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen, dtype=D64))
    return lin


def random_scales(k, gen, spread=1.5):
    return torch.exp(spread * torch.randn(k, generator=gen, dtype=D64))


def attention(q, k, v, num_heads, num_kv_heads):
    """Causal attention by explicit loops over query heads: [T, H*hd], [T, KV*hd] -> [T, H*hd]."""
    t = q.shape[0]
    hd = q.shape[1] // num_heads
    n_rep = num_heads // num_kv_heads
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    outs = []
    for h in range(num_heads):
        j = h // n_rep
        qh, kh, vh = q[:, h * hd:(h + 1) * hd], k[:, j * hd:(j + 1) * hd], v[:, j * hd:(j + 1) * hd]
        logits = (qh @ kh.T / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(logits, -1) @ vh)
    return torch.cat(outs, -1)


def close(a, b, atol=1e-12):
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_rmsnorm_qkv_is_exact(bias):
    gen = torch.Generator().manual_seed(1)
    d = 32
    x = torch.randn(9, d, generator=gen, dtype=D64)
    g = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=gen, dtype=D64))
    qkv = [linear(d, 32, gen, bias), linear(d, 16, gen, bias), linear(d, 16, gen, bias)]
    before = [lin(rmsnorm(x, g)) for lin in qkv]
    g0, w0 = g.detach().clone(), qkv[0].weight.detach().clone()
    s = random_scales(d, gen)
    fold_into_norm(g, qkv, s)
    after = [lin(rmsnorm(x, g)) for lin in qkv]
    for a, b in zip(before, after):
        close(a, b)
    # the fold really moved something: g / s and W * s
    close(g.detach(), g0 / s, atol=0.0)
    close(qkv[0].weight.detach(), w0 * s, atol=0.0)


def test_fold_into_layernorm_with_bias_is_exact():
    gen = torch.Generator().manual_seed(2)
    d = 16
    norm = torch.nn.LayerNorm(d, dtype=D64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen, dtype=D64))
        norm.bias.copy_(torch.randn(d, generator=gen, dtype=D64))
    ups = [linear(d, 24, gen), linear(d, 24, gen)]
    x = torch.randn(5, d, generator=gen, dtype=D64)
    before = [u(norm(x)) for u in ups]
    fold_into_norm(norm, ups, random_scales(d, gen))
    for a, u in zip(before, ups):
        close(a, u(norm(x)))


def test_fold_linear_into_linear_is_exact_with_rows():
    gen = torch.Generator().manual_seed(3)
    d, k = 16, 24
    x = torch.randn(7, d, generator=gen, dtype=D64)
    # all rows of the producer
    l1, l2 = linear(d, k, gen), linear(k, 20, gen)
    before = l2(l1(x))
    fold_into_linear(l1, [l2], random_scales(k, gen))
    close(before, l2(l1(x)))
    # a producer with more outputs; the consumer reads K of them, given as indices and as a slice
    wide = linear(d, 40, gen)
    idx = torch.randperm(40, generator=gen)[:k]
    cons = linear(k, 8, gen)
    other = torch.ones(40, dtype=torch.bool)
    other[idx] = False
    before, rest = cons(wide(x)[:, idx]), wide(x)[:, other]
    fold_into_linear(wide, [cons], random_scales(k, gen), rows=idx)
    close(before, cons(wide(x)[:, idx]))
    close(rest, wide(x)[:, other], atol=0.0)  # untouched rows are untouched
    before = cons(wide(x)[:, 8:32])
    fold_into_linear(wide, [cons], random_scales(k, gen), rows=slice(8, 32))
    close(before, cons(wide(x)[:, 8:32]))


def test_fold_v_into_o_without_gqa_is_exact():
    gen = torch.Generator().manual_seed(4)
    d, heads, hd = 32, 4, 8
    x = torch.randn(6, d, generator=gen, dtype=D64)
    q, k, v = (linear(d, heads * hd, gen) for _ in range(3))
    o = linear(heads * hd, d, gen)

    def block():
        return o(attention(q(x), k(x), v(x), heads, heads))

    before = block()
    fold_into_linear(v, [o], random_scales(heads * hd, gen))
    close(before, block())


@pytest.mark.parametrize("fused", [False, True])
def test_fold_v_into_o_with_gqa_is_exact(fused):
    gen = torch.Generator().manual_seed(5)
    d, heads, kv, hd = 32, 6, 2, 8
    n_rep = heads // kv
    x = torch.randn(6, d, generator=gen, dtype=D64)
    o = linear(heads * hd, d, gen)
    if fused:  # one qkv Linear; v is the last kv*hd rows
        qkv = linear(d, (heads + 2 * kv) * hd, gen)
        v_rows = slice((heads + kv) * hd, (heads + 2 * kv) * hd)

        def block():
            y = qkv(x)
            return o(attention(y[:, :heads * hd], y[:, heads * hd:(heads + kv) * hd], y[:, v_rows], heads, kv))

        producer, rows = qkv, v_rows
    else:
        q, k, v = linear(d, heads * hd, gen), linear(d, kv * hd, gen), linear(d, kv * hd, gen)

        def block():
            return o(attention(q(x), k(x), v(x), heads, kv))

        producer, rows = v, None
    s_kv = random_scales(kv * hd, gen)
    # o_proj's input channel h*hd + i comes from value channel (h // n_rep)*hd + i
    s = torch.cat([s_kv[(h // n_rep) * hd:(h // n_rep + 1) * hd] for h in range(heads)])
    assert torch.equal(expand_kv_scales(s_kv, heads, kv), s)
    assert torch.equal(kv_scales(s, heads, kv), s_kv)
    before = block()
    fold_into_v_proj(producer, o, s, heads, kv, rows=rows)
    close(before, block())


def test_tie_gqa_scales_is_exact_geometric_mean():
    gen = torch.Generator().manual_seed(6)
    heads, kv, hd = 4, 2, 16
    s = random_scales(heads * hd, gen)
    tied = tie_gqa_scales(s, heads, kv)
    grouped = tied.reshape(kv, heads // kv, hd)
    assert torch.equal(grouped, grouped[:, :1].expand_as(grouped))  # exactly equal inside a group
    for j in range(kv):
        for i in range(hd):
            members = [float(s[h * hd + i]) for h in range(j * 2, j * 2 + 2)]
            assert float(grouped[j, 0, i]) == pytest.approx(math.sqrt(members[0] * members[1]), rel=1e-12)
    kv_scales(tied, heads, kv)  # foldable
    with pytest.raises(ValueError, match="share a kv head"):
        kv_scales(s, heads, kv)


def test_fold_power_of_two_scales_exact_in_bfloat16():
    gen = torch.Generator().manual_seed(7)
    d = 16
    g = torch.randn(d, generator=gen).to(torch.bfloat16)
    w = torch.randn(8, d, generator=gen).to(torch.bfloat16)
    s = 2.0 ** torch.randint(-3, 4, (d,), generator=gen).float()
    g0, w0 = g.clone(), w.clone()
    fold_into_norm(g, [w], s)
    assert g.dtype == w.dtype == torch.bfloat16
    assert torch.equal(g.float(), g0.float() / s) and torch.equal(w.float(), w0.float() * s)


# ----------------------------------------------------------------------------------- scale formulas


def test_smoothquant_scales_hand_computed():
    x_amax = torch.tensor([4.0, 1.0, 9.0, 0.25])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 1.0], [-3.0, 1.0, 1.0, 0.5]])
    w2 = torch.tensor([[0.5, 0.5, -4.0, 2.0]])
    w_amax = [3.0, 2.0, 4.0, 2.0]  # per-channel max |W| over both weights
    for alpha in (0.5, 0.75):
        raw = [xa ** alpha / wa ** (1 - alpha) for xa, wa in zip([4.0, 1.0, 9.0, 0.25], w_amax)]
        gm = math.prod(raw) ** (1 / 4)
        want = torch.tensor([r / gm for r in raw], dtype=D64)
        got = smoothquant_scales(x_amax, [w1, w2], alpha=alpha)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # float64 in, float64 out
    got = smoothquant_scales(x_amax.double(), [w1.double(), w2.double()], alpha=0.5)
    raw = [math.sqrt(xa / wa) for xa, wa in zip([4.0, 1.0, 9.0, 0.25], w_amax)]
    gm = math.prod(raw) ** 0.25
    torch.testing.assert_close(got, torch.tensor([r / gm for r in raw], dtype=D64), rtol=1e-13, atol=0)


def test_smoothquant_scales_clamp_dead_channels():
    w = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-3.0, 1.0, 0.0, 0.5]], dtype=D64)
    x_amax = torch.tensor([4.0, 0.0, 9.0, 1.0], dtype=D64)  # channel 1 never fires; channel 2's weights are 0
    s = smoothquant_scales(x_amax, [w], alpha=0.5, floor=1e-5)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    xa = [4.0, 9.0 * 1e-5, 9.0, 1.0]  # floored at 1e-5 * max
    wa = [3.0, 2.0, 3.0 * 1e-5, 1.0]
    raw = [math.sqrt(a / b) for a, b in zip(xa, wa)]
    gm = math.prod(raw) ** 0.25
    torch.testing.assert_close(s, torch.tensor([r / gm for r in raw], dtype=D64), rtol=1e-12, atol=0)
    # the range is bounded by the floor, whatever the data
    assert float(s.max() / s.min()) <= 1e5 * (1 + 1e-12)
    # activations all zero: only the weight term remains (s ~ 1 / w_amax^(1 - alpha))
    s0 = smoothquant_scales(torch.zeros(4, dtype=D64), [w], alpha=0.5)
    raw = [1 / math.sqrt(b) for b in wa]
    gm = math.prod(raw) ** 0.25
    torch.testing.assert_close(s0, torch.tensor([r / gm for r in raw], dtype=D64), rtol=1e-12, atol=0)


def test_awq_statistics_and_scales_by_formula():
    gen = torch.Generator().manual_seed(8)
    w1 = torch.randn(3, 32, generator=gen, dtype=D64)
    w2 = torch.randn(2, 32, generator=gen, dtype=D64)
    w2[1, 16:] = 0.0  # an all-zero block contributes 0
    want = torch.zeros(32, dtype=D64)
    for w in (w1, w2):
        for r in range(w.shape[0]):
            for b in range(2):
                blk = w[r, 16 * b:16 * (b + 1)].abs()
                m = float(blk.max())
                for i in range(16):
                    want[16 * b + i] += float(blk[i]) / m if m > 0 else 0.0
    want /= 5
    torch.testing.assert_close(weight_block_mean([w1, w2]), want, rtol=1e-13, atol=0)
    x_mean = torch.rand(32, generator=gen, dtype=D64) + 0.1
    alpha = 0.3
    raw = [float(a) ** alpha / float(b) ** (1 - alpha) for a, b in zip(x_mean, want)]
    gm = math.exp(sum(math.log(r) for r in raw) / 32)
    torch.testing.assert_close(awq_scales(x_mean, want, alpha), torch.tensor([r / gm for r in raw], dtype=D64),
                               rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------- the search


def reference_error(x, ws, s, w4a4, act_amax=None, weight_amax=None):
    """sum_i ||x W_i^T - Q_a(x / s) Q_w(W_i * s)^T||^2 from fake_quantize directly."""
    xs = x / s
    if w4a4:
        xq = fake_quantize(xs, global_amax=tensor_amax(xs) if act_amax is None else act_amax)
    else:
        xq = xs
    total = 0.0
    for w in ws:
        wq = fake_quantize(w * s, global_amax=weight_amax)
        total += float((x @ w.T - xq @ wq.T).double().square().sum())
    return total


def outlier_inputs(gen, t, k, n_outliers, factor=50.0, dtype=torch.float32):
    x = torch.randn(t, k, generator=gen, dtype=dtype)
    cols = torch.randperm(k, generator=gen)[:n_outliers]
    x[:, cols] *= factor
    return x


def test_grid_one_is_the_unscaled_baseline():
    gen = torch.Generator().manual_seed(9)
    x = outlier_inputs(gen, 40, 32, 3)
    ws = [torch.randn(24, 32, generator=gen), torch.randn(8, 32, generator=gen)]
    for w4a4 in (False, True):
        r = awq_search(x, ws, w4a4=w4a4, grid=1)
        assert r.alpha == 0.0 and torch.equal(r.s, torch.ones(32))
        assert r.losses[0] == pytest.approx(reference_error(x, ws, torch.ones(32), w4a4), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.integers(1, 40),
    k=st.sampled_from([16, 32, 48]),
    ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    n_outliers=st.integers(0, 4),
    w4a4=st.booleans(),
    grid=st.integers(1, 6),
    double=st.booleans(),
)
def test_search_never_worse_than_baseline(seed, t, k, ns, n_outliers, w4a4, grid, double):
    gen = torch.Generator().manual_seed(seed)
    dt = D64 if double else torch.float32
    x = outlier_inputs(gen, t, k, n_outliers, factor=30.0, dtype=dt)
    ws = [torch.randn(n, k, generator=gen, dtype=dt) * 0.1 for n in ns]
    r = awq_search(x, ws, w4a4=w4a4, grid=grid, chunk_tokens=16)
    rtol = 1e-10 if double else 1e-5
    assert len(r.losses) == grid and r.alphas == [i / grid for i in range(grid)]
    assert r.s.dtype == dt and r.s.shape == (k,) and bool((r.s > 0).all())
    # candidate 0 is the plain quantization error, computed here without the module
    assert r.losses[0] == pytest.approx(reference_error(x, ws, torch.ones(k, dtype=dt), w4a4), rel=rtol, abs=1e-30)
    best = min(r.losses)
    assert best <= r.losses[0]
    assert r.losses[round(r.alpha * grid)] == best
    if r.alpha == 0.0:
        assert torch.equal(r.s, torch.ones(k, dtype=dt))
    # the reported loss is the error of the returned s
    assert best == pytest.approx(reference_error(x, ws, r.s, w4a4), rel=rtol, abs=1e-30)


def test_search_reduces_w4a4_error_with_outlier_channels_and_folds():
    gen = torch.Generator().manual_seed(10)
    t, d = 256, 128
    h = torch.randn(t, d, generator=gen)
    g = torch.ones(d)
    g[torch.randperm(d, generator=gen)[:4]] = 50.0  # the norm makes 4 outlier channels
    x = rmsnorm(h, g)
    ws = [torch.randn(64, d, generator=gen) * 0.02, torch.randn(32, d, generator=gen) * 0.02,
          torch.randn(32, d, generator=gen) * 0.02]
    base = reference_error(x, ws, torch.ones(d), True)
    r = awq_search(x, ws, w4a4=True)
    assert r.losses[0] == pytest.approx(base, rel=1e-5)
    assert min(r.losses) < 0.8 * base and r.alpha > 0
    # fold the found scales into the norm and the weights; quantize the folded model as it would be
    g2, ws2 = g.clone(), [w.clone() for w in ws]
    fold_into_norm(g2, ws2, r.s)
    x2 = rmsnorm(h, g2)
    xq = fake_quantize(x2, global_amax=tensor_amax(x2))
    folded = sum(float((x @ w.T - xq @ fake_quantize(w2).T).double().square().sum()) for w, w2 in zip(ws, ws2))
    assert folded == pytest.approx(min(r.losses), rel=1e-3)
    assert folded < 0.8 * base
    # W4A16: never worse than no scaling (and here it helps too)
    r16 = awq_search(x, ws, w4a4=False)
    assert min(r16.losses) <= r16.losses[0] == pytest.approx(reference_error(x, ws, torch.ones(d), False), rel=1e-5)
    assert min(r16.losses) < r16.losses[0]


def test_search_with_gqa_returns_tied_scales():
    gen = torch.Generator().manual_seed(11)
    heads, kv, hd = 4, 2, 16
    x = outlier_inputs(gen, 64, heads * hd, 3)
    o = torch.randn(32, heads * hd, generator=gen) * 0.05
    r = awq_search(x, [o], w4a4=True, grid=8, gqa=(heads, kv))
    assert r.alpha > 0  # outliers make some scaling worth it
    s_kv = kv_scales(r.s, heads, kv)  # raises if not tied
    assert torch.equal(expand_kv_scales(s_kv, heads, kv), r.s)
    assert min(r.losses) <= r.losses[0]


def test_smoothing_error_static_amax_and_shared_weight_amax():
    gen = torch.Generator().manual_seed(12)
    x = outlier_inputs(gen, 30, 32, 2)
    ws = [torch.randn(8, 32, generator=gen), 3 * torch.randn(8, 32, generator=gen)]
    s = torch.exp(0.5 * torch.randn(32, generator=gen))
    x_amax = x.abs().amax(0) * 1.5  # the full calibration set saw larger values than this sample
    want = reference_error(x, ws, s, True, act_amax=(x_amax / s).amax())
    assert smoothing_error(x, ws, s, w4a4=True, x_amax=x_amax, chunk_tokens=7) == pytest.approx(want, rel=1e-5)
    shared = max(float(tensor_amax(w * s)) for w in ws)
    want = reference_error(x, ws, s, False, weight_amax=shared)
    assert smoothing_error(x, ws, s, w4a4=False, shared_weight_amax=True) == pytest.approx(want, rel=1e-5)
    # the static amax from x_amax enters the search too
    r = awq_search(x, ws, w4a4=True, grid=1, x_amax=x_amax)
    assert r.losses[0] == pytest.approx(reference_error(x, ws, torch.ones(32), True, act_amax=x_amax.amax()), rel=1e-5)


# ------------------------------------------------------------------------------------------- errors


def test_errors_name_the_offending_tensor():
    x = torch.randn(8, 32)
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"weights\[1\].*K mismatch"):
        awq_search(x, [w, torch.randn(4, 16)], w4a4=True)
    with pytest.raises(ValueError, match=r"x: K mismatch.*\(8, 48\)"):
        awq_search(torch.randn(8, 48), [w], w4a4=False)
    with pytest.raises(ValueError, match="multiple of the NVFP4 block size"):
        awq_search(torch.randn(8, 20), [torch.randn(4, 20)], w4a4=False)
    with pytest.raises(ValueError, match="x: contains NaN"):
        awq_search(torch.full((8, 32), float("nan")), [w], w4a4=False)
    with pytest.raises(ValueError, match=r"x_amax: expected shape \[32\]"):
        awq_search(x, [w], w4a4=True, x_amax=torch.ones(16))
    with pytest.raises(ValueError, match="grid"):
        awq_search(x, [w], w4a4=True, grid=0)
    with pytest.raises(ValueError, match="non-empty list"):
        awq_search(x, [], w4a4=True)
    with pytest.raises(ValueError, match="x_amax: expected non-negative"):
        smoothquant_scales(-torch.ones(32), [w])
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(torch.ones(32), [w], alpha=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        awq_search(x, [w], w4a4=True, gqa=(3, 2))


def test_fold_errors_modify_nothing():
    g = torch.ones(32)
    w = torch.randn(4, 32)
    s = torch.ones(32)
    s[5] = 0.0
    with pytest.raises(ValueError, match=r"s: scales must be > 0.*channel 5"):
        fold_into_norm(g, [w], s)
    with pytest.raises(ValueError, match=r"s: expected shape \[32\], got \(16,\)"):
        fold_into_norm(g, [w], torch.ones(16))
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"linears\[1\].*\(4, 16\)"):
        fold_into_norm(g, [w, torch.randn(4, 16)], torch.full((32,), 2.0))
    assert torch.equal(g, torch.ones(32)) and torch.equal(w, w0)  # validated before anything changed
    with pytest.raises(ValueError, match="norm.weight"):
        fold_into_norm(torch.ones(4, 8), [w], torch.ones(32))
    prev = torch.nn.Linear(16, 24)
    with pytest.raises(ValueError, match=r"prev_linear.weight: has 24 output rows.*K is 32"):
        fold_into_linear(prev, [w], torch.ones(32))
    with pytest.raises(ValueError, match="rows: the slice"):
        fold_into_linear(prev, [w], torch.ones(32), rows=slice(0, 8))
    with pytest.raises(ValueError, match="rows: indices must lie"):
        fold_into_linear(torch.nn.Linear(16, 40), [w], torch.ones(32), rows=torch.arange(32) + 10)
    untied = torch.arange(1, 65, dtype=torch.float32)
    with pytest.raises(ValueError, match="share a kv head"):
        fold_into_v_proj(torch.nn.Linear(8, 32), torch.nn.Linear(64, 8), untied, 4, 2)
    with pytest.raises(ValueError, match=r"o_proj.weight"):
        fold_into_v_proj(torch.nn.Linear(8, 32), torch.ones(64), untied, 4, 2)
