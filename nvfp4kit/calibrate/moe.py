"""Mixture-of-experts layouts for calibration and quantization.

Transformers stores the experts of Mixtral / Qwen-MoE style models as 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). NVFP4 checkpoints store one Linear per
expert (``...experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``), and calibration observes
Linears, so :func:`unfuse_experts` swaps each fused module for :class:`UnfusedExperts`, a
``ModuleList`` of per-expert MLPs that computes exactly the same function.

The calibration rule for experts lives in :mod:`nvfp4kit.calibrate.observers`: every expert sees
every calibration token that reached its MoE layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..policy import EXPERTS_LIST
from .surgery import replace_module


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Per-expert Linears with the fused module's call signature ``(hidden, top_k_index, top_k_weights)``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        n = len(self)
        for e in range(n):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module with the chunked gate/up layout and no biases."""
    gu = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.ndim == 3 and down.ndim == 3
        and hasattr(module, "act_fn")
    )


def _unfused_from(module: nn.Module, name: str) -> UnfusedExperts:
    gu, down = module.gate_up_proj, module.down_proj
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj")]
    if extra or getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        raise ValueError(
            f"{name}: fused experts with parameters {extra or 'in a transposed/biased layout'} are not supported "
            "(only the gate_up_proj [E, 2I, H] / down_proj [E, H, I] layout)"
        )
    E, two_i, H = gu.shape
    inter = two_i // 2
    if down.shape != (E, H, inter):
        raise ValueError(f"{name}: down_proj shape {tuple(down.shape)} does not match gate_up_proj {tuple(gu.shape)}")
    experts = UnfusedExperts()
    for e in range(E):
        mlp = ExpertMLP(H, inter, module.act_fn, dtype=gu.dtype, device=gu.device)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(gu[e, :inter])
            mlp.up_proj.weight.copy_(gu[e, inter:])
            mlp.down_proj.weight.copy_(down[e])
        experts.append(mlp)
    return experts


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused-experts module by :class:`UnfusedExperts` in place; returns their names."""
    targets = [(n, m) for n, m in model.named_modules() if n and is_fused_experts(m)]
    for name, module in targets:
        replace_module(model, name, _unfused_from(module, name))
    return [n for n, _ in targets]


def expert_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """``(name, list)`` of every ModuleList called ``experts`` (:data:`nvfp4kit.policy.EXPERTS_LIST`)
    whose members hold Linears."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == EXPERTS_LIST and len(m) > 0:
            if all(any(isinstance(c, nn.Linear) for c in e.modules()) for e in m):
                out.append((name, m))
    return out


__all__ = ["ExpertMLP", "UnfusedExperts", "expert_lists", "is_fused_experts", "unfuse_experts"]
