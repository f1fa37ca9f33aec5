"""Multi-token prediction: ``u = eh_proj(cat[enorm(emb(x_{t+d})), hnorm(h_t)])``, then the MTP
blocks (attention, MoE by default), ``final_layernorm`` and the shared ``lm_head``.

One MTP module (``num_nextn_predict_layers`` = 1 in the released models) is applied recursively:
depth d reads the output of depth d-1 (depth 1 reads the main model's output after ``norm_f``).
Module names follow the released layout: ``mtp.layers.{i}`` is the i-th block; the first block of a
predict layer also holds ``enorm``/``hnorm``/``eh_proj``, the last one ``final_layernorm``.
"""

from __future__ import annotations

import torch

from .blocks import Block
from .linear import make_linear
from .norms import RMSNorm


class MTPBlock(Block):
    def __init__(self, config, block_type: str, layer_idx: int, first: bool, last: bool, device=None, dtype=None):
        super().__init__(config, block_type, layer_idx, device=device, dtype=dtype)
        kw = dict(device=device, dtype=dtype)
        eps = config.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(config.hidden_size, eps=eps, **kw)
            self.hnorm = RMSNorm(config.hidden_size, eps=eps, **kw)
            self.eh_proj = make_linear(2 * config.hidden_size, config.hidden_size, **kw)
        if last:
            self.final_layernorm = RMSNorm(config.hidden_size, eps=eps, **kw)
        self.first, self.last = first, last


class MTP(torch.nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.pattern_types = config.mtp_layer_types
        self.num_predict_layers = config.num_nextn_predict_layers
        n = len(self.pattern_types)
        blocks = []
        for j in range(self.num_predict_layers):
            for i, bt in enumerate(self.pattern_types):
                blocks.append(MTPBlock(config, bt, j * n + i, first=i == 0, last=i == n - 1, device=device,
                                       dtype=dtype))
        self.layers = torch.nn.ModuleList(blocks)

    def predict_layer(self, depth: int) -> list[MTPBlock]:
        """The blocks used at ``depth`` (1-based): predict layers are reused cyclically."""
        n = len(self.pattern_types)
        j = (depth - 1) % self.num_predict_layers
        return list(self.layers[j * n:(j + 1) * n])

    def new_states(self, depth: int, batch: int, device=None, dtype=None) -> list:
        return [b.new_state(batch, device=device, dtype=dtype) for b in self.predict_layer(depth)]

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, depth: int, states: list | None = None):
        """h_prev [B,L,d] (hidden at position t), emb_next [B,L,d] (embedding of the token at t+depth).
        Returns the normalised hidden [B,L,d] whose lm_head logits predict the token at t+depth+1."""
        blocks = self.predict_layer(depth)
        first = blocks[0]
        u = first.eh_proj(torch.cat([first.enorm(emb_next), first.hnorm(h_prev)], dim=-1))
        for i, blk in enumerate(blocks):
            u = blk(u, None if states is None else states[i])
        return blocks[-1].final_layernorm(u)
