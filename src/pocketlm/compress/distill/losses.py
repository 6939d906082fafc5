"""Distillation losses: logit KL at a temperature, and hidden-state MSE through a learned projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher_T || student_T) × T² (Hinton et al.: the T² keeps the gradient's
    scale independent of T). logits (..., vocab); mask (...) bool selects the tokens that count."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1) * t * t
    if mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1)
    return kl.mean()


class HiddenProjection(nn.Module):
    """Maps each chosen student layer's hidden state to the teacher's width (identity when equal)."""

    def __init__(self, student_width: int, teacher_width: int, layers: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Identity() if student_width == teacher_width
                                  else nn.Linear(student_width, teacher_width, bias=False) for _ in range(layers))

    def loss(self, student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
        """Mean MSE over the paired layers (teacher states normalized by their RMS, so layers weigh alike)."""
        total = 0.0
        for proj, s, t in zip(self.maps, student_hidden, teacher_hidden):
            t = t.float()
            scale = t.pow(2).mean().sqrt().clamp(min=1e-6)
            total = total + F.mse_loss(proj(s.float()) / scale, t / scale)
        return total / len(self.maps)


def pair_layers(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i (outputs, 1-based as in HF hidden_states) ↔ the teacher layer at the same depth."""
    return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]
