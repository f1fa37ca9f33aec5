"""Mamba-2 mixer in plain PyTorch: causal depthwise conv, chunked SSD scan, gated grouped RMSNorm,
and a recurrent single-token decode step.

Shapes: x [B, L, H, P], dt [B, L, H] (after softplus), A [H] (negative), B/C [B, L, G, N];
head h reads group h // (H // G). The SSM state is [B, H, P, N] in fp32:
``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.

On CUDA, when the ``mamba_ssm`` package is importable, its fused chunk-scan kernel replaces the
plain chunked scan (same arguments, same result up to rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .linear import make_linear
from .norms import GatedGroupRMSNorm


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ssd_reference_scan(x, dt, A, B, C, D=None, initial_state=None):
    """Step-by-step recurrence (the definition), in float64 when given float64 inputs.

    Returns ``(y [B,L,H,P], final_state [B,H,P,N])``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    acc = _acc_dtype(x)
    xs, dts, Bs, Cs = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    Bh = Bs.repeat_interleave(r, dim=2)  # [b,l,h,n]
    Ch = Cs.repeat_interleave(r, dim=2)
    state = torch.zeros(b, h, p, n, dtype=acc, device=x.device) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(l):
        decay = torch.exp(dts[:, t] * A.to(acc))  # [b,h]
        state = state * decay[:, :, None, None] + (dts[:, t, :, None, None] * xs[:, t, :, :, None]
                                                    * Bh[:, t, :, None, :])
        y = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + D.to(acc)[:, None] * xs[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_chunked_scan(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None):
    """Chunked SSD scan: quadratic attention-like form inside each chunk, a linear recurrence of
    chunk states across chunks. Exact for any length (padding steps have dt = 0, which neither
    decay nor feed the state). Returns ``(y [B,L,H,P] in x.dtype, final_state [B,H,P,N] fp32/fp64)``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd_chunked_scan: {h} heads do not divide into {g} groups")
    r = h // g
    acc = _acc_dtype(x)
    pad = (-l) % chunk_size
    xs, dts, Bs, Cs = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    if pad:
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        dts = F.pad(dts, (0, 0, 0, pad))
        Bs = F.pad(Bs, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(Cs, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // chunk_size
    L = chunk_size
    xs = xs.reshape(b, c, L, g, r, p)
    dts = dts.reshape(b, c, L, g, r)
    Bs = Bs.reshape(b, c, L, g, n)
    Cs = Cs.reshape(b, c, L, g, n)
    dA = dts * A.to(acc).reshape(g, r)
    Acum = torch.cumsum(dA, dim=2).permute(0, 1, 3, 4, 2)  # [b,c,g,r,L]
    xdt = xs * dts[..., None]  # [b,c,L,g,r,p]

    # 1. within each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(Acum_t - Acum_s) dt_s x_s
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (Acum[..., :, None] - Acum[..., None, :]).masked_fill(~causal, float("-inf"))
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cs, Bs)
    M = CB[:, :, :, None] * torch.exp(seg)  # [b,c,g,r,t,s]
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", M, xdt)

    # 2. state contributed by each chunk alone, at its end
    decay_to_end = torch.exp(Acum[..., -1:] - Acum)  # [b,c,g,r,L]
    chunk_states = torch.einsum("bcgrs,bcsgn,bcsgrp->bcgrpn", decay_to_end, Bs, xdt)

    # 3. carry states across chunks: S_in(c+1) = exp(sum dA over chunk c) S_in(c) + chunk_states(c)
    chunk_decay = torch.exp(Acum[..., -1])  # [b,c,g,r]
    if initial_state is None:
        state = torch.zeros(b, g, r, p, n, dtype=acc, device=x.device)
    else:
        state = initial_state.to(acc).reshape(b, g, r, p, n)
    entering = []
    for ci in range(c):
        entering.append(state)
        state = state * chunk_decay[:, ci, :, :, None, None] + chunk_states[:, ci]
    entering = torch.stack(entering, dim=1)  # [b,c,g,r,p,n]

    # 4. contribution of the entering state: y_t += exp(Acum_t) C_t . S_in
    y = y + torch.einsum("bctgn,bcgrpn,bcgrt->bctgrp", Cs, entering, torch.exp(Acum))
    y = y.reshape(b, c * L, h, p)[:, :l]
    if D is not None:
        y = y + D.to(acc)[:, None] * x.to(acc)
    return y.to(x.dtype), state.reshape(b, h, p, n)


def ssd_step(state, x, dt, A, B, C, D=None):
    """One recurrent step. state [B,H,P,N] (fp32, updated and returned), x [B,H,P], dt [B,H],
    B/C [B,G,N]. Returns ``(y [B,H,P] in x.dtype, new_state)``."""
    h = x.shape[1]
    r = h // B.shape[1]
    acc = state.dtype
    Bh = B.to(acc).repeat_interleave(r, dim=1)
    Ch = C.to(acc).repeat_interleave(r, dim=1)
    dtf = dt.to(acc)
    xf = x.to(acc)
    decay = torch.exp(dtf * A.to(acc))
    state = state * decay[:, :, None, None] + dtf[:, :, None, None] * xf[:, :, :, None] * Bh[:, :, None, :]
    y = (state * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(acc)[:, None] * xf
    return y.to(x.dtype), state


def _fused_chunk_scan():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # the package is optional and often absent
        return None
    return mamba_chunk_scan_combined


class MambaState:
    """Decode state of one Mamba layer: the last K-1 conv inputs and the SSM state.

    With ``record`` on, a multi-token forward keeps the state after every token so that
    :meth:`keep` can roll back to any prefix (speculative decoding).
    """

    def __init__(self, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        self.conv_state = conv_state  # [B, conv_dim, K-1]
        self.ssm_state = ssm_state  # [B, H, P, N] fp32
        self.record = False
        self._hist = None  # (xcat [B, conv_dim, K-1+m], ssm states [m, B, H, P, N])

    def keep(self, n_tokens: int) -> None:
        """Keep the state after the first ``n_tokens`` of the last recorded forward."""
        if self._hist is None:
            raise RuntimeError("MambaState.keep: no recorded forward to roll back")
        xcat, states = self._hist
        if not 1 <= n_tokens <= states.shape[0]:
            raise ValueError(f"MambaState.keep: n_tokens={n_tokens} outside 1..{states.shape[0]}")
        k1 = self.conv_state.shape[-1]
        self.conv_state = xcat[:, :, n_tokens:n_tokens + k1].clone()
        self.ssm_state = states[n_tokens - 1].clone()
        self._hist = None


class Mamba2Mixer(torch.nn.Module):
    def __init__(self, config, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.mamba_num_heads
        self.head_dim = c.mamba_head_dim
        self.n_groups = c.n_groups
        self.state_size = c.ssm_state_size
        self.chunk_size = c.chunk_size
        self.conv_kernel = c.conv_kernel
        self.intermediate_size = c.mamba_intermediate_size
        self.conv_dim = c.mamba_conv_dim
        self.time_step_limit = tuple(c.time_step_limit)
        kw = dict(device=device, dtype=dtype)
        self.in_proj = make_linear(c.hidden_size, c.mamba_in_proj_size, bias=c.mamba_proj_bias, **kw)
        self.conv1d = torch.nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                      bias=c.use_conv_bias, padding=0, **kw)
        self.dt_bias = torch.nn.Parameter(torch.ones(self.num_heads, **kw))
        self.A_log = torch.nn.Parameter(torch.zeros(self.num_heads, **kw))
        self.D = torch.nn.Parameter(torch.ones(self.num_heads, **kw))
        self.norm = GatedGroupRMSNorm(self.intermediate_size, self.n_groups, eps=c.layer_norm_epsilon, **kw)
        self.out_proj = make_linear(self.intermediate_size, c.hidden_size, bias=c.mamba_proj_bias, **kw)

    # ---- state ---------------------------------------------------------------------------------
    def new_state(self, batch: int, device=None, dtype=None) -> MambaState:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(
            torch.zeros(batch, self.conv_dim, self.conv_kernel - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.num_heads, self.head_dim, self.state_size, device=device,
                        dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        )

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(dt_raw.dtype, torch.float32)
        dt = F.softplus(dt_raw.to(acc) + self.dt_bias.to(acc))
        lo, hi = self.time_step_limit
        if lo > 0 or math.isfinite(hi):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def _split_xbc(self, xbc: torch.Tensor):
        b, l, _ = xbc.shape
        di, gn = self.intermediate_size, self.n_groups * self.state_size
        x, Bm, Cm = torch.split(xbc, [di, gn, gn], dim=-1)
        return (x.reshape(b, l, self.num_heads, self.head_dim), Bm.reshape(b, l, self.n_groups, self.state_size),
                Cm.reshape(b, l, self.n_groups, self.state_size))

    def forward(self, hidden: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        b, l, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)
        z, xbc, dt_raw = torch.split(zxbcdt, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        dt = self._dt(dt_raw)
        k1 = self.conv_kernel - 1
        xbc_t = xbc.transpose(1, 2)  # [B, conv_dim, L]
        if state is None:
            xcat = F.pad(xbc_t, (k1, 0))
        else:
            xcat = torch.cat([state.conv_state.to(xbc_t.dtype), xbc_t], dim=-1)
        conv = F.silu(F.conv1d(xcat, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        x, Bm, Cm = self._split_xbc(conv.transpose(1, 2))

        if state is not None and (l == 1 or state.record):
            ssm = state.ssm_state
            ys, hist = [], []
            for t in range(l):
                y_t, ssm = ssd_step(ssm, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], self.D)
                ys.append(y_t)
                if state.record:
                    hist.append(ssm)
            y = torch.stack(ys, dim=1)
            if state.record:
                state._hist = (xcat, torch.stack(hist))
            state.ssm_state = ssm
        else:
            init = state.ssm_state if state is not None else None
            fused = _fused_chunk_scan() if hidden.is_cuda else None
            if fused is not None:
                y, final = fused(x, dt.to(x.dtype), A, Bm, Cm, self.chunk_size, D=self.D.float(),
                                 initial_states=init, return_final_states=True)
                final = final.float()
            else:
                y, final = ssd_chunked_scan(x, dt, A, Bm, Cm, self.chunk_size, D=self.D, initial_state=init)
            if state is not None:
                state.ssm_state = final
        if state is not None:
            state.conv_state = xcat[:, :, xcat.shape[-1] - k1:].detach().clone()
        y = self.norm(y.reshape(b, l, self.intermediate_size).to(hidden.dtype), z)
        return self.out_proj(y)

    @torch.no_grad()
    def init_weights(self, config, generator=None) -> None:
        dev = self.A_log.device
        if dev.type == "meta":
            return
        # depthwise conv: torch's default range (fan_in = kernel width), drawn from the seeded generator
        bound = 1.0 / math.sqrt(self.conv1d.weight.shape[-1])
        self.conv1d.weight.copy_((torch.rand(self.conv1d.weight.shape, generator=generator) * 2 - 1) * bound)
        if self.conv1d.bias is not None:
            self.conv1d.bias.copy_((torch.rand(self.conv1d.bias.shape, generator=generator) * 2 - 1) * bound)
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        u = torch.rand(self.num_heads, generator=generator)
        dt = torch.exp(u * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
