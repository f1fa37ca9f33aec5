"""Causal grouped-query attention without positional encoding (Nemotron-H), with a KV cache.

``Attention.kv_hook`` (None by default) is an optional ``(k, v) -> (k, v)`` callable applied to the
new keys and values, ``[B, kv_heads, L, head_dim]``, just before they enter the cache: FP8 KV-cache
calibration observes them there and evaluation quantize-dequantizes them there
(:mod:`nvfp4kit.calibrate.kv_cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import make_linear


class KVCache:
    """Keys/values of one attention layer, [B, kv_heads, T, head_dim]; ``crop`` rolls back."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, length: int) -> None:
        if self.k is not None:
            self.k = self.k[:, :, :length]
            self.v = self.v[:, :, :length]


class Attention(torch.nn.Module):
    def __init__(self, config, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scale = c.head_dim ** -0.5
        kw = dict(device=device, dtype=dtype, bias=c.attention_bias)
        self.q_proj = make_linear(c.hidden_size, self.num_heads * self.head_dim, **kw)
        self.k_proj = make_linear(c.hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.v_proj = make_linear(c.hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.o_proj = make_linear(self.num_heads * self.head_dim, c.hidden_size, **kw)
        self.kv_hook = None  # optional (k, v) -> (k, v) on the keys/values as they are cached

    def new_state(self, batch: int, device=None, dtype=None) -> KVCache:
        return KVCache()

    def forward(self, hidden: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        b, l, _ = hidden.shape
        q = self.q_proj(hidden).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_hook is not None:
            k, v = self.kv_hook(k, v)
        past = 0
        if state is not None:
            past = state.length
            k, v = state.append(k, v)
        if past == 0:
            mask, causal = None, l > 1
        elif l == 1:
            mask, causal = None, False
        else:
            # query i (absolute position past + i) sees keys 0 .. past + i
            kpos = torch.arange(past + l, device=hidden.device)
            qpos = torch.arange(l, device=hidden.device) + past
            mask, causal = kpos[None, :] <= qpos[:, None], False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))
