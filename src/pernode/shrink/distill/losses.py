"""Knowledge-distillation losses: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv
1503.02531): soft targets at temperature T, scaled by T^2, mixed with the hard-label cross-entropy by a weight.

The teacher arrives as its top-k logits per position (`TeacherTopK`, cached on disk) or as full logits (k = vocab).
Forward KL(p_teacher || q_student) compares on the teacher's top-k support with the student's full-vocabulary
log-probabilities, so student mass outside the teacher's top-k is penalised. Reverse KL(q || p) (the mode-seeking
direction of Gu et al. 2023, MiniLLM, arXiv 2306.08543) needs the student's distribution on the same support, so both
sides are renormalised over the top-k there. With k = vocab both are the exact divergences.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Divergence(str, enum.Enum):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's k largest logits at each position and their token ids: [..., k] each."""

    values: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TeacherTopK":
        values, indices = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
        return cls(values, indices)


def soft_target_kl(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float,
                   divergence: Divergence = Divergence.FORWARD_KL) -> torch.Tensor:
    """Mean over positions of KL at `temperature` (not yet scaled by T^2). student_logits [..., vocab]."""
    t = float(temperature)
    p_log = F.log_softmax(teacher.values.float() / t, dim=-1)  # teacher, renormalised over its top-k
    s_scaled = student_logits.float() / t
    if divergence is Divergence.FORWARD_KL:
        q_log = s_scaled.gather(-1, teacher.indices) - torch.logsumexp(s_scaled, dim=-1, keepdim=True)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    elif divergence is Divergence.REVERSE_KL:
        q_log = F.log_softmax(s_scaled.gather(-1, teacher.indices), dim=-1)
        kl = (q_log.exp() * (q_log - p_log)).sum(-1)
    else:
        raise ValueError(f"divergence={divergence!r} is not supported: allowed forward_kl, reverse_kl")
    return kl.mean()


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTopK | None,
                      temperature: float = 2.0, alpha: float = 0.5,
                      divergence: Divergence = Divergence.FORWARD_KL) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * T^2 * KL(soft targets) + (1 - alpha) * CE(labels); teacher None or alpha 0 -> hard labels only.

    T^2 keeps the soft-target gradients' magnitude independent of T (they scale as 1/T^2, Hinton et al. sec. 2).
    Returns the loss and its parts as floats for logging."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is out of range: allowed 0..1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is out of range: allowed > 0")
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.float().reshape(-1, vocab), labels.reshape(-1))
    parts = {"ce": ce.item()}
    if teacher is None or alpha == 0.0:
        return ce, parts
    kl = soft_target_kl(student_logits, teacher, temperature, divergence)
    parts["kl"] = kl.item()
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce, parts
