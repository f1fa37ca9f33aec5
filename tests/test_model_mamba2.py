"""Mamba-2 mixer: chunked SSD scan against a float64 step-by-step recurrence, decode step, conv,
gated norm, and prefill-then-decode against one full forward."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.model.mamba2 import Mamba2Mixer, ssd_chunked_scan, ssd_reference_scan, ssd_step
from nvfp4kit.model.norms import GatedGroupRMSNorm
from nvfp4kit.model.presets import get_preset


pytestmark = pytest.mark.usefixtures("single_thread")



def plain_recurrence(x, dt, A, B, C, D, h0):
    """Independent float64 loop over batch, time, head, channel: the SSM definition."""
    b, l, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    h = h0.double().clone() if h0 is not None else torch.zeros(b, H, P, N, dtype=torch.float64)
    y = torch.zeros(b, l, H, P, dtype=torch.float64)
    for bi in range(b):
        for t in range(l):
            for hd in range(H):
                g = hd // (H // G)
                a = math.exp(float(dt[bi, t, hd]) * float(A[hd]))
                h[bi, hd] = a * h[bi, hd] + float(dt[bi, t, hd]) * torch.outer(x[bi, t, hd], B[bi, t, g])
                y[bi, t, hd] = h[bi, hd] @ C[bi, t, g] + D[hd] * x[bi, t, hd]
    return y, h


def _inputs(b, l, H, P, G, N, seed, slow=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, H, generator=g, dtype=dtype) - 1.0)
    # slowly decaying heads keep state alive across many chunks
    A = -(torch.rand(H, generator=g, dtype=dtype) * (0.01 if slow else 1.0) + 1e-3)
    B = torch.randn(b, l, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, l, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


def test_reference_scan_equals_plain_loop():
    x, dt, A, B, C, D, h0 = _inputs(2, 9, 4, 3, 2, 5, 0)
    y0, f0 = plain_recurrence(x, dt, A, B, C, D, h0)
    y1, f1 = ssd_reference_scan(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1, f0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l,chunk", [(100, 16), (64, 16), (5, 16), (131, 32), (1, 8)])
@pytest.mark.parametrize("slow", [False, True])
def test_chunked_scan_matches_recurrence_float64(l, chunk, slow):
    # several chunks, lengths not divisible by the chunk, G < H, initial state
    x, dt, A, B, C, D, h0 = _inputs(2, l, 6, 4, 2, 8, l + chunk, slow=slow)
    y0, f0 = plain_recurrence(x, dt, A, B, C, D, h0) if l <= 8 else ssd_reference_scan(x, dt, A, B, C, D, h0)
    y1, f1 = ssd_chunked_scan(x, dt, A, B, C, chunk, D=D, initial_state=h0)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-10)


def test_state_crosses_chunk_boundaries():
    # a head with almost no decay: the output late in the sequence depends on input from chunk 0
    x, dt, A, B, C, D, _ = _inputs(1, 64, 2, 2, 1, 4, 3, slow=True)
    y_a, _ = ssd_chunked_scan(x, dt, A, B, C, 8)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y_b, _ = ssd_chunked_scan(x2, dt, A, B, C, 8)
    assert (y_a[:, -1] - y_b[:, -1]).abs().max() > 1e-3
    y_ref, _ = ssd_reference_scan(x2, dt, A, B, C)
    torch.testing.assert_close(y_b, y_ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=25)
@given(b=st.integers(1, 2), l=st.integers(1, 70), r=st.integers(1, 3), G=st.integers(1, 3), P=st.integers(1, 5),
       N=st.integers(1, 6), chunk=st.sampled_from([4, 8, 16, 32]), seed=st.integers(0, 2 ** 16),
       with_state=st.booleans())
def test_chunked_scan_property(b, l, r, G, P, N, chunk, seed, with_state):
    x, dt, A, B, C, D, h0 = _inputs(b, l, r * G, P, G, N, seed, slow=seed % 2 == 0)
    h0 = h0 if with_state else None
    y0, f0 = ssd_reference_scan(x, dt, A, B, C, D, h0)
    y1, f1 = ssd_chunked_scan(x, dt, A, B, C, chunk, D=D, initial_state=h0)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f1, f0, rtol=1e-9, atol=1e-9)


def test_chunked_scan_float32_close_to_float64():
    x, dt, A, B, C, D, h0 = _inputs(2, 300, 8, 16, 2, 32, 7, slow=True)
    y0, f0 = ssd_reference_scan(x, dt, A, B, C, D, h0)
    y1, f1 = ssd_chunked_scan(*(t.float() for t in (x, dt, A, B, C)), 128, D=D.float(), initial_state=h0.float())
    assert y1.dtype == torch.float32
    assert ((y1.double() - y0).abs().max() / y0.abs().max()) < 1e-5
    assert ((f1.double() - f0).abs().max() / f0.abs().max()) < 1e-5


def test_step_equals_recurrence():
    x, dt, A, B, C, D, h0 = _inputs(2, 6, 4, 3, 2, 5, 11)
    y0, f0 = plain_recurrence(x, dt, A, B, C, D, h0)
    h = h0.clone()
    for t in range(6):
        y, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        torch.testing.assert_close(y, y0[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, f0, rtol=1e-12, atol=1e-12)


def test_gated_group_norm_formula():
    g = torch.Generator().manual_seed(0)
    y, z = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    norm = GatedGroupRMSNorm(24, 3, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    out = norm(y, z)
    ref = torch.empty_like(y)
    for gi in range(3):
        sl = slice(8 * gi, 8 * gi + 8)
        hg = y[..., sl] * z[..., sl] * torch.sigmoid(z[..., sl])
        ref[..., sl] = hg / torch.sqrt(hg.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref * norm.weight, rtol=1e-5, atol=1e-6)


def _mixer(seed=0, **over):
    cfg = get_preset("micro", **over)
    torch.manual_seed(seed)
    m = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        m.init_weights(cfg, generator=torch.Generator().manual_seed(seed))
        m.conv1d.bias.normal_()
    return m


def mixer_reference(m, hidden):
    """The mixer written out token by token in float64: projection, causal conv over the last K
    inputs, softplus dt, recurrence, gated group norm, output projection."""
    b, l, _ = hidden.shape
    zxbcdt = hidden @ m.in_proj.weight.T
    di, cd, H = m.intermediate_size, m.conv_dim, m.num_heads
    z, xbc, dtr = zxbcdt[..., :di], zxbcdt[..., di:di + cd], zxbcdt[..., di + cd:]
    K = m.conv_kernel
    w = m.conv1d.weight[:, 0, :]  # [cd, K]
    conv = torch.zeros_like(xbc)
    for t in range(l):
        acc = m.conv1d.bias.clone().expand(b, cd).clone()
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xbc[:, src]
        conv[:, t] = acc * torch.sigmoid(acc)
    G, N, P = m.n_groups, m.state_size, m.head_dim
    x = conv[..., :di].reshape(b, l, H, P)
    Bm = conv[..., di:di + G * N].reshape(b, l, G, N)
    Cm = conv[..., di + G * N:].reshape(b, l, G, N)
    dt = F.softplus(dtr + m.dt_bias)
    A = -torch.exp(m.A_log)
    y, _ = plain_recurrence(x, dt, A, Bm, Cm, m.D, None)
    y = y.reshape(b, l, di)
    return m.out_proj(m.norm(y, z))


def test_mixer_matches_written_out_reference():
    m = _mixer(chunk_size=8)
    hidden = torch.randn(2, 21, m.in_proj.in_features, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(hidden), mixer_reference(m, hidden), rtol=1e-9, atol=1e-9)


def test_no_dt_clamp():
    # dt far below time_step_min must pass through unclamped
    m = _mixer()
    with torch.no_grad():
        m.dt_bias.fill_(-12.0)
    dt = m._dt(torch.zeros(1, 1, m.num_heads, dtype=torch.float64))
    assert float(dt.detach().max()) < 1e-5


@pytest.mark.parametrize("split", [1, 7, 8, 9, 30])
def test_prefill_then_decode_equals_full_forward(split):
    m = _mixer(1, chunk_size=8)
    hidden = torch.randn(2, 37, m.in_proj.in_features, dtype=torch.float64)
    with torch.no_grad():
        full = m(hidden)
        state = m.new_state(2)
        assert state.ssm_state.dtype == torch.float64
        parts = [m(hidden[:, :split], state)]
        for t in range(split, 33):
            parts.append(m(hidden[:, t:t + 1], state))  # recurrent single-token step
        parts.append(m(hidden[:, 33:], state))  # chunked continuation from a carried state
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_decode_state_float32_model():
    m = _mixer(2, chunk_size=16).float()
    hidden = torch.randn(1, 40, m.in_proj.in_features)
    with torch.no_grad():
        full = m(hidden)
        state = m.new_state(1)
        assert state.ssm_state.dtype == torch.float32
        parts = [m(hidden[:, :20], state)] + [m(hidden[:, t:t + 1], state) for t in range(20, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_recorded_forward_rolls_back():
    m = _mixer(3, chunk_size=8)
    hidden = torch.randn(1, 20, m.in_proj.in_features, dtype=torch.float64)
    with torch.no_grad():
        ref_state = m.new_state(1)
        m(hidden[:, :13], ref_state)
        st_ = m.new_state(1)
        m(hidden[:, :10], st_)
        st_.record = True
        m(hidden[:, 10:16], st_)  # 6 tokens, keep the first 3
        st_.keep(3)
        torch.testing.assert_close(st_.ssm_state, ref_state.ssm_state)
        torch.testing.assert_close(st_.conv_state, ref_state.conv_state)
        with pytest.raises(ValueError, match="n_tokens"):
            st_._hist = (torch.zeros(1, 1, 3), torch.zeros(2, 1))
            st_.keep(5)
