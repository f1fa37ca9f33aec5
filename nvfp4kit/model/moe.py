"""Squared-ReLU MLP, the sigmoid top-k router with score-correction bias, and (Latent)MoE.

Routed experts are separate Linear modules (``experts.{e}.up_proj`` / ``down_proj``). Tokens are
dispatched by sorting the (token, slot) pairs by expert: the work is proportional to
tokens x top-k, and only experts that received tokens run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import make_linear


class MLP(torch.nn.Module):
    """``down(relu(up(x))**2)``"""

    def __init__(self, in_features: int, hidden: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.up_proj = make_linear(in_features, hidden, bias=bias, device=device, dtype=dtype)
        self.down_proj = make_linear(hidden, in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class TopkRouter(torch.nn.Module):
    """``s = sigmoid(x W^T)`` in fp32; experts chosen by top-k of ``s + e_score_correction_bias``
    (optionally group-limited); weights are the unbiased ``s`` of the chosen experts, renormalised
    when ``norm_topk_prob``, times ``routed_scaling_factor``. Kept in fp32 (not a quantizable Linear)."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        c = config
        self.num_experts = c.n_routed_experts
        self.top_k = c.num_experts_per_tok
        self.n_group = c.n_group
        self.topk_group = c.topk_group
        self.norm_topk_prob = c.norm_topk_prob
        self.routed_scaling_factor = float(c.routed_scaling_factor)
        self.weight = torch.nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(c.n_routed_experts, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [T, d] -> (weights [T, k], indices [T, k] int64, scores [T, E]); weights and scores in
        fp32 (fp64 for fp64 input)."""
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        scores = torch.sigmoid(F.linear(x.to(acc), self.weight.to(acc)))
        choice = scores + self.e_score_correction_bias.to(acc)
        if self.n_group > 1:
            t = choice.shape[0]
            per = self.num_experts // self.n_group
            grouped = choice.view(t, self.n_group, per)
            group_score = grouped.topk(min(2, per), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, self.num_experts)
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor, idx, scores


def dispatch_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts) -> torch.Tensor:
    """``sum_j weights[t, j] * experts[idx[t, j]](x[t])`` for every token t, by grouping the
    (token, slot) pairs by expert. x [T, D]; returns [T, D] accumulated in fp32 (fp64 for fp64 input)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    t, k = idx.shape
    if t == 0:
        return x.new_zeros(0, x.shape[-1], dtype=torch.promote_types(x.dtype, torch.float32))
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x[token_of]
    w_sorted = weights.reshape(-1)[order].to(acc)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        outs.append(experts[e](xs[start:start + n]))
        start += n
    out_sorted = torch.cat(outs, dim=0).to(acc) * w_sorted[:, None]
    y = torch.zeros(t, out_sorted.shape[-1], device=x.device, dtype=acc)
    return y.index_add(0, token_of, out_sorted)


class MoE(torch.nn.Module):
    """Routed experts (on a latent width when ``moe_latent_size`` is set) plus a shared expert at full width."""

    def __init__(self, config, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        kw = dict(device=device, dtype=dtype)
        self.gate = TopkRouter(c, **kw)
        dim = c.moe_expert_dim
        self.experts = torch.nn.ModuleList(
            MLP(dim, c.moe_intermediate_size, bias=c.mlp_bias, **kw) for _ in range(c.n_routed_experts))
        self.shared_experts = MLP(c.hidden_size, c.moe_shared_expert_intermediate_size, bias=c.mlp_bias, **kw)
        self.latent = bool(c.moe_latent_size)
        if self.latent:
            self.fc1_latent_proj = make_linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias, **kw)
            self.fc2_latent_proj = make_linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias, **kw)

    def forward(self, hidden: torch.Tensor, state=None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        w, idx, _ = self.gate(x)
        xe = self.fc1_latent_proj(x) if self.latent else x
        routed = dispatch_experts(xe, w, idx, self.experts).to(hidden.dtype)
        if self.latent:
            routed = self.fc2_latent_proj(routed)
        return (routed + self.shared_experts(x)).reshape(shape)


class DenseMLP(MLP):
    """The ``-`` block: a squared-ReLU MLP at ``intermediate_size``."""

    def __init__(self, config, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, device=device,
                         dtype=dtype)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return super().forward(x)
