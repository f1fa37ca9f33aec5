"""What nvfp4kit computes from a causal language model's output: its logits, the next-token loss and
the distillation divergence. One owner for each formula, used by the model's own loss, perplexity,
calibration, the mixed-precision search, QAT and QAD.

* :func:`shifted_cross_entropy`: float32 cross-entropy of ``logits[:, t]`` against
  ``labels[:, t + shift]`` (ignore index -100); ``shift=1`` is the next-token loss, larger shifts the
  multi-token-prediction losses.
* :func:`distillation_loss`: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token.
* :func:`causal_lm_logits`: ``[B, T, V]`` logits of an HF causal LM or the Nemotron 3 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int = 1,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (float32) of ``logits[:, t]`` predicting ``labels[:, t + shift]``; ``reduction``
    ``"mean"`` (over the predicted tokens) or ``"sum"``. No predicted token: a zero that keeps the graph."""
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"next-token loss: logits {tuple(logits.shape)} do not match the token ids "
                         f"{tuple(labels.shape)}")
    T = labels.shape[1]
    if T <= shift:
        return logits.sum() * 0.0
    pred = logits[:, :T - shift].float()
    target = labels[:, shift:]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from positions <= t (float32)."""
    return shifted_cross_entropy(logits, input_ids, 1, reduction)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per token, averaged over tokens
    (those where ``mask`` is true, if given). Float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {tuple(student_logits.shape)} != teacher "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [..., tokens]
    if mask is not None:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1) * temperature**2
    return kl.mean() * temperature**2


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with ``.logits``, a tuple or a dict."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def run_causal_lm(model: nn.Module, input_ids: torch.Tensor):
    """Call ``model`` on token ids ``[B, T]`` without a KV cache (HF models), or plainly (other models)."""
    try:
        return model(input_ids=input_ids, use_cache=False)
    except TypeError:
        return model(input_ids)


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of an HF causal LM or the Nemotron 3 model for ``input_ids`` ``[B, T]``."""
    return logits_of(run_causal_lm(model, input_ids))


__all__ = ["IGNORE_INDEX", "causal_lm_logits", "distillation_loss", "logits_of", "next_token_loss",
           "run_causal_lm", "shifted_cross_entropy"]
