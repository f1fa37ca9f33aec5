"""Router and (Latent)MoE against direct per-token references; dispatch cost."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.model.moe import MLP, MoE, TopkRouter, dispatch_experts
from nvfp4kit.model.presets import get_preset


pytestmark = pytest.mark.usefixtures("single_thread")



def route_reference(x, W, bias, k, scale, norm=True, n_group=1, topk_group=1):
    """One token at a time, with Python lists: sigmoid scores, top-k by biased score (within the best
    groups), unbiased weights renormalised and scaled."""
    out_w, out_i = [], []
    E = W.shape[0]
    for t in range(x.shape[0]):
        s = [1 / (1 + torch.exp(-(x[t].double() @ W[e].double())).item()) for e in range(E)]
        biased = [s[e] + float(bias[e]) for e in range(E)]
        allowed = set(range(E))
        if n_group > 1:
            per = E // n_group
            gscore = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
            best = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            allowed = {e for g in best for e in range(g * per, (g + 1) * per)}
        chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
        w = [s[e] for e in chosen]
        if norm:
            tot = sum(w)
            w = [v / tot for v in w]
        out_w.append([v * scale for v in w])
        out_i.append(chosen)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_i)


def _router(E=16, k=4, d=32, n_group=1, topk_group=1, norm=True, scale=2.5, seed=0):
    cfg = get_preset("micro", n_routed_experts=E, num_experts_per_tok=k, hidden_size=d, n_group=n_group,
                     topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale)
    g = torch.Generator().manual_seed(seed)
    r = TopkRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, d, generator=g))
        r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return r


def _sorted_by_index(w, i):
    order = i.argsort(-1)
    return w.gather(1, order), i.gather(1, order)


@settings(max_examples=30)
@given(E=st.sampled_from([4, 8, 16]), k=st.integers(1, 4), norm=st.booleans(), seed=st.integers(0, 999),
       grouped=st.booleans())
def test_router_matches_reference(E, k, norm, seed, grouped):
    n_group, topk_group = (4, 2) if grouped else (1, 1)
    if grouped and k > E // 2:
        k = E // 2
    r = _router(E=E, k=k, norm=norm, n_group=n_group, topk_group=topk_group, seed=seed)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(seed + 1))
    w, i, scores = r(x)
    assert w.dtype == torch.float32 and scores.dtype == torch.float32
    rw, ri = route_reference(x, r.weight, r.e_score_correction_bias, k, 2.5, norm, n_group, topk_group)
    w, i = _sorted_by_index(w, i)
    rw, ri = _sorted_by_index(rw, ri)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)


def test_bias_changes_choice_not_weight():
    r = _router(E=8, k=2, seed=3)
    x = torch.randn(5, 32)
    with torch.no_grad():
        r.e_score_correction_bias.zero_()
        r.e_score_correction_bias[5] = 100.0  # expert 5 always chosen
    w, i, s = r(x)
    assert (i == 5).any(-1).all()
    # its weight comes from the unbiased score
    pos = (i == 5).int().argmax(-1)
    other = 1 - pos
    s5 = s[:, 5]
    so = s.gather(1, i.gather(1, other[:, None]))[:, 0]
    torch.testing.assert_close(w.gather(1, pos[:, None])[:, 0], 2.5 * s5 / (s5 + so))


def _moe(latent, seed=0, **over):
    cfg = get_preset("micro", moe_latent_size=64 if latent else None, **over)
    torch.manual_seed(seed)
    m = MoE(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m, cfg


def moe_reference(m, cfg, x):
    """Token by token: route, run each chosen expert on the (latent) input, weight, sum, shared."""
    rw, ri = route_reference(x, m.gate.weight, m.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                             cfg.routed_scaling_factor)
    out = []
    for t in range(x.shape[0]):
        xt = x[t]
        xl = m.fc1_latent_proj.weight @ xt if cfg.moe_latent_size else xt
        acc = torch.zeros_like(xl)
        for j in range(ri.shape[1]):
            ex = m.experts[int(ri[t, j])]
            acc = acc + rw[t, j] * (ex.down_proj.weight @ torch.relu(ex.up_proj.weight @ xl) ** 2)
        if cfg.moe_latent_size:
            acc = m.fc2_latent_proj.weight @ acc
        sh = m.shared_experts
        out.append(acc + sh.down_proj.weight @ torch.relu(sh.up_proj.weight @ xt) ** 2)
    return torch.stack(out)


@pytest.mark.parametrize("latent", [True, False])
def test_moe_matches_per_token_reference(latent):
    m, cfg = _moe(latent)
    x = torch.randn(2, 13, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    ref = moe_reference(m, cfg, x.reshape(-1, cfg.hidden_size)).reshape(y.shape)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_dispatch_runs_only_chosen_experts_on_their_tokens():
    m, cfg = _moe(True, seed=1)
    calls = {}
    for e, ex in enumerate(m.experts):
        ex.register_forward_hook(lambda mod, inp, out, e=e: calls.__setitem__(e, calls.get(e, 0) + inp[0].shape[0]))
    x = torch.randn(3, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        _, idx, _ = m.gate(x)
        m(x[None])
    expect = torch.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts)
    assert sum(calls.values()) == 3 * cfg.num_experts_per_tok  # work: tokens x top-k rows
    assert set(calls) == {e for e in range(cfg.n_routed_experts) if expect[e] > 0}
    for e, n in calls.items():
        assert n == int(expect[e])


def test_dispatch_gradients_match_dense_reference():
    g = torch.Generator().manual_seed(0)
    experts = torch.nn.ModuleList(MLP(8, 16).double() for _ in range(5))
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True, generator=g)
    idx = torch.randint(0, 5, (6, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1 + torch.randint(0, 4, (6,), generator=g)) % 5
    w = torch.rand(6, 2, dtype=torch.float64, generator=g)
    y = dispatch_experts(x, w, idx, experts)
    ref = torch.stack([sum(w[t, j] * experts[int(idx[t, j])](x[t]) for j in range(2)) for t in range(6)])
    torch.testing.assert_close(y.double(), ref)
    (gy,) = torch.autograd.grad(y.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gy, gr)


def test_dense_mlp_is_squared_relu():
    mlp = MLP(8, 16).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    ref = F.linear(torch.clamp(F.linear(x, mlp.up_proj.weight), min=0) ** 2, mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), ref)
