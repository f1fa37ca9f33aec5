"""Causal GQA attention without positional encoding: explicit softmax reference, KV cache."""

import math

import pytest
import torch

from nvfp4kit.model.attention import Attention
from nvfp4kit.model.presets import get_preset


pytestmark = pytest.mark.usefixtures("single_thread")



def _attn(seed=0, **over):
    cfg = get_preset("micro", **over)
    torch.manual_seed(seed)
    return Attention(cfg).double(), cfg


def reference(att, cfg, x):
    """Per head, per query position: softmax over keys 0..t of q.k / sqrt(d), no positions."""
    b, l, _ = x.shape
    H, KV, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ att.q_proj.weight.T).view(b, l, H, d)
    k = (x @ att.k_proj.weight.T).view(b, l, KV, d)
    v = (x @ att.v_proj.weight.T).view(b, l, KV, d)
    out = torch.zeros(b, l, H, d, dtype=x.dtype)
    for bi in range(b):
        for h in range(H):
            kv = h // (H // KV)
            for t in range(l):
                s = (k[bi, :t + 1, kv] @ q[bi, t, h]) / math.sqrt(d)
                out[bi, t, h] = torch.softmax(s, 0) @ v[bi, :t + 1, kv]
    return out.reshape(b, l, H * d) @ att.o_proj.weight.T


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (4, 1)])
def test_matches_reference(heads, kv):
    att, cfg = _attn(num_attention_heads=heads, num_key_value_heads=kv)
    x = torch.randn(2, 11, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x), reference(att, cfg, x), rtol=1e-10, atol=1e-10)


def test_no_positional_encoding():
    # without positions, the last token's output ignores the order of the tokens before it
    att, cfg = _attn(1)
    x = torch.randn(1, 9, cfg.hidden_size, dtype=torch.float64)
    perm = torch.cat([torch.randperm(8), torch.tensor([8])])
    with torch.no_grad():
        torch.testing.assert_close(att(x)[:, -1], att(x[:, perm])[:, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 5, 12])
def test_prefill_then_decode_equals_full(split):
    att, cfg = _attn(2)
    x = torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = att(x)
        cache = att.new_state(2)
        parts = [att(x[:, :split], cache)]
        for t in range(split, 13):
            parts.append(att(x[:, t:t + 1], cache))
        parts.append(att(x[:, 13:], cache))  # several new tokens on top of a cache
        assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_cache_crop():
    att, cfg = _attn(3)
    x = torch.randn(1, 10, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = att(x)
        cache = att.new_state(1)
        att(x[:, :8], cache)
        cache.crop(6)
        out = att(x[:, 6:], cache)
    torch.testing.assert_close(out, full[:, 6:], rtol=1e-10, atol=1e-10)
