"""Sparse KD recovery: prune, then distill the surviving weights from the dense model with the masks fixed.

Minitron (Muralidharan et al. 2024, arXiv 2407.14679) recovers a structurally pruned model by distilling it from the
unpruned one; Kurtic et al. 2023 ("Sparse Fine-tuning for Inference Acceleration of Large Language Models", arXiv
2310.06927) do the same for unstructured and N:M masks. Here the teacher is the dense model itself (its top-k
logits cached before pruning), the data is `pernode distill`'s (never the perplexity protocol's evaluation text),
and the pruned entries stay exactly zero: their gradients are masked (so AdamW's moments for them stay zero and
the clipping norm counts only survivors) and the mask is re-applied after every optimizer step, so rounding or
weight decay can not revive one. Exact sparsity and the N:M pattern therefore survive training.

The order matters for prune + quantize: recover BEFORE quantizing (prune -> KD with masks -> GPTQ on the recovered
survivors); GPTQ keeps the zeros (`pruned_mask`) and compensates its rounding on the recovered weights.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from pernode.shrink.distill.data import distillation_text, pack_windows, shuffled_windows
from pernode.shrink.distill.teacher_cache import TeacherCache, build_teacher_cache
from pernode.shrink.distill.trainer import TrainingConfig, autocast_dtype, train_student
from pernode.shrink.methods.common import projections, pruned_mask
from pernode.shrink.methods.modifier import require

CHARS_PER_TOKEN = 3.0  # as `pernode distill`: too much text is cheap, too little is not


@dataclass(frozen=True)
class KDRecovery:
    """How the pruned model is distilled from its dense self: 60 steps of 4 x 256 tokens at lr 2e-4 with bf16
    autocast are what docs/pruning.md measured; the (tied) embedding stays frozen, the norms train with the
    surviving weights."""

    steps: int = 60
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    top_k: int = 64
    temperature: float = 1.0
    warmup_steps: int = 10
    seed: int = 0
    dtype: str = "auto"
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 8), ("top_k", 1), ("warmup_steps", 0),
                          ("checkpoint_every", 0)):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= low, name, getattr(self, name),
                    f">= {low}")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(self.temperature > 0, "temperature", self.temperature, "> 0")

    def training(self) -> TrainingConfig:
        return TrainingConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, temperature=self.temperature,
                              alpha=1.0, warmup_steps=min(self.warmup_steps, self.steps), seed=self.seed,
                              dtype=self.dtype, checkpoint_every=self.checkpoint_every)

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def kd_windows(tokenizer, recovery: KDRecovery) -> tuple[torch.Tensor, dict]:
    """[steps x batch, seq_len] training windows of `pernode distill`'s text (the pydoc calibration part and the
    stdlib's training files: the evaluation split of the perplexity protocol is never in it), and its provenance."""
    needed = recovery.steps * recovery.batch_size
    chars = int(needed * recovery.seq_len * CHARS_PER_TOKEN)
    while True:  # code packs more characters per token than prose: ask for more text until every step's is new
        text = distillation_text(chars, seed=recovery.seed)
        docs = [tokenizer.encode(t, add_special_tokens=False) for t in text.train]
        windows = shuffled_windows(pack_windows(docs, recovery.seq_len, tokenizer.eos_token_id), recovery.seed)
        if windows.shape[0] >= needed or text.provenance["stdlib"]["train_chars"] < chars - len(text.train[0]):
            break  # enough, or the stdlib is used up (the trainer then walks more than one epoch)
        chars = int(chars * 1.5 * needed / max(1, windows.shape[0]))
    text.provenance["windows"] = {"available": windows.shape[0], "used": needed, "seq_len": recovery.seq_len}
    return windows[:needed], text.provenance


def teacher_cache(dense_model, windows: torch.Tensor, folder: str, recovery: KDRecovery, teacher_id: str,
                  quiet: bool = False) -> TeacherCache:
    """The dense model's top-k logits on the KD windows; build it BEFORE pruning `dense_model` in place."""
    amp = autocast_dtype(recovery.dtype, dense_model.embed_tokens.weight.device)
    return build_teacher_cache(dense_model, windows, folder, recovery.top_k, teacher_id=teacher_id,
                               autocast_dtype=amp, quiet=quiet, temperature=recovery.temperature)


def masked_projections(model) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(weight, keep-mask) of every projection a pruner marked (`pruned_mask`)."""
    found = []
    for layer in model.layers:
        for _, _, linear in projections(layer):
            keep = pruned_mask(linear)
            if keep is not None:
                found.append((linear.weight, keep.to(linear.weight.device)))
    return found


def apply_masks(masked: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for weight, keep in masked:
            weight.mul_(keep)


def recover(model, windows: torch.Tensor, cache: TeacherCache, recovery: KDRecovery, state_dir: str | None = None,
            resume: bool = False, quiet: bool = False) -> dict:
    """Distill the pruned `model` in place from the dense model's cached logits, its masks fixed. Returns the loss
    history and the time taken."""
    masked = masked_projections(model)
    require(bool(masked), "model", "no pruned projections", "a model a pruner has run on (its masks on the Linears)")
    hooks = [weight.requires_grad_(True).register_hook(lambda grad, keep=keep: grad * keep) for weight, keep in masked]
    started = time.perf_counter()
    try:
        history = train_student(model, windows, cache, recovery.training(), state_dir, resume, quiet=quiet,
                                after_step=lambda: apply_masks(masked))
    finally:
        for hook in hooks:
            hook.remove()
    apply_masks(masked)  # a resumed state is masked already; this keeps the invariant whatever came before
    return {"config": recovery.to_dict(), "tokens": windows.numel(), "history": history,
            "train_s": round(time.perf_counter() - started, 1),
            "state": None if state_dir is None else os.path.abspath(state_dir)}
