"""The QAT / QAD objective: next-token loss, or the KL divergence to a frozen full-precision teacher
(formulas in :mod:`nvfp4kit.losses`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...losses import distillation_loss, next_token_loss
from .prepare import fake_quant_modules


@dataclass
class QATLoss:
    """The training objective: next-token loss (QAT), or KL to a frozen teacher (QAD) plus an
    optional ``ce_weight`` times the next-token loss."""

    distill: bool = False
    temperature: float = 1.0
    ce_weight: float = 0.0

    def __call__(self, student_logits, input_ids, teacher_logits=None) -> torch.Tensor:
        if not self.distill:
            return next_token_loss(student_logits, input_ids)
        if teacher_logits is None:
            raise ValueError("QATLoss: distillation needs the teacher's logits")
        loss = distillation_loss(student_logits, teacher_logits, self.temperature)
        if self.ce_weight:
            loss = loss + self.ce_weight * next_token_loss(student_logits, input_ids)
        return loss


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy of ``model`` (call before :func:`prepare_qat`)."""
    if fake_quant_modules(model):
        raise ValueError("frozen_teacher: the model already has fake-quant modules; copy it before prepare_qat")
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = ["QATLoss", "frozen_teacher"]
