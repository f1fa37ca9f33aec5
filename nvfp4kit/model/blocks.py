"""One residual layer: ``x + mixer(RMSNorm(x))``, with the mixer chosen by the pattern letter."""

from __future__ import annotations

import torch

from .attention import Attention
from .mamba2 import Mamba2Mixer
from .moe import DenseMLP, MoE
from .norms import RMSNorm

MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "moe": MoE, "mlp": DenseMLP}


class Block(torch.nn.Module):
    def __init__(self, config, block_type: str, layer_idx: int, device=None, dtype=None):
        super().__init__()
        if block_type not in MIXERS:
            raise ValueError(f"layer {layer_idx}: unknown block type {block_type!r}; known: {sorted(MIXERS)}")
        self.block_type = block_type
        self.layer_idx = layer_idx
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, device=device, dtype=dtype)
        self.mixer = MIXERS[block_type](config, layer_idx=layer_idx, device=device, dtype=dtype)

    def new_state(self, batch: int, device=None, dtype=None):
        if self.block_type in ("mamba", "attention"):
            return self.mixer.new_state(batch, device=device, dtype=dtype)
        return None

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)
