"""Perplexity of a causal LM on a token stream (non-overlapping windows, CPU friendly)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import progress
from ..losses import causal_lm_logits, next_token_loss


def ppl_from_nll(nll: float) -> float:
    """``exp(nll)``: ``inf`` where it overflows a float (a model whose losses are astronomically large,
    e.g. from corrupt weights), ``nan`` for a NaN loss; never an ``OverflowError``."""
    if math.isnan(nll):
        return math.nan
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Perplexity:
    ppl: float  # inf / nan when the model's losses are not finite (see ``finite``)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens
    bos_id: int | None = None  # the token every window started with (None: windows start in the text)

    @property
    def finite(self) -> bool:
        """False when the perplexity is infinite or NaN (the model produced NaN / infinite logits, or
        losses too large for a float): a broken model, not a measurement."""
        return math.isfinite(self.ppl)


def model_device(model: nn.Module) -> torch.device:
    """The device a model computes on (its first parameter's, or buffer's)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512, max_tokens: int | None = None,
               desc: str = "perplexity", bos_id: int | None = None) -> Perplexity:
    """``exp(mean NLL)`` over non-overlapping windows of ``seq_len`` tokens.

    Without ``bos_id`` each window is ``seq_len`` tokens of the text and predicts its tokens 2..L.
    With ``bos_id`` (the tokenizer's BOS, see :func:`nvfp4kit.calibrate.data.sample_bos`) each window is
    BOS followed by ``seq_len - 1`` tokens of the text and predicts every one of them, as
    lm-eval-harness's rolling log-likelihood does. ``max_tokens`` caps how much of ``token_ids`` is
    used. A final partial window with at least one prediction is evaluated too.
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    model.eval()
    device = model_device(model)
    width = seq_len - 1 if bos_id is not None else seq_len
    least = 1 if bos_id is not None else 2
    starts = [s for s in range(0, ids.numel(), width) if ids.numel() - s >= least]
    total, count = 0.0, 0
    with progress.task(desc, total=len(starts)) as t:
        for s in starts:
            window = ids[s:s + width]
            if bos_id is not None:
                window = torch.cat([window.new_full((1,), bos_id), window])
            window = window.unsqueeze(0).to(device)
            nll = next_token_loss(causal_lm_logits(model, window), window, reduction="sum")
            total += float(nll)
            count += window.shape[1] - 1
            t.advance(1, ppl=ppl_from_nll(total / count))
    mean = total / count
    return Perplexity(ppl_from_nll(mean), mean, count, bos_id)
