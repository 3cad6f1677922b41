"""Knowledge distillation of a smaller student from the served model (Hinton et al. 2015, arXiv 1503.02531): a
student from chosen teacher layers (optionally narrowed by structured pruning), soft targets from the teacher's
cached top-k logits, sequence-level KD on the teacher's own chat replies, and a checkpoint the engine serves; and
the KD recovery of a pruned model from its dense self with the masks fixed (`sparse_recovery`)."""
from __future__ import annotations

from pernode.shrink.distill.losses import Divergence, TeacherTopK, distillation_loss, soft_target_kl
from pernode.shrink.distill.run import DistillConfig, distill
from pernode.shrink.distill.student import StudentSpec, build_student
from pernode.shrink.distill.teacher_cache import TeacherCache, build_teacher_cache
from pernode.shrink.distill.trainer import TrainingConfig, train_student

__all__ = ["Divergence", "DistillConfig", "StudentSpec", "TeacherCache", "TeacherTopK", "TrainingConfig",
           "build_student", "build_teacher_cache", "distill", "distillation_loss", "soft_target_kl",
           "train_student"]
