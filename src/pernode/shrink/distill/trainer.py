"""The training loop: AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast where the CPU does
bf16 natively, and checkpoint/resume in safetensors + JSON (no pickle).

Batches follow from (seed, step) alone (a seeded permutation per epoch), so a resumed run sees exactly the batches
the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from pernode.shrink.distill.losses import Divergence, distillation_loss
from pernode.shrink.distill.progress import StepProgress
from pernode.shrink.distill.teacher_cache import TeacherCache
from pernode.shrink.training_forward import logits as forward_logits

STATE_JSON = "state.json"


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16 in /proc/cpuinfo: bf16 matmuls run natively instead of being emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def training_threads() -> int:
    """Threads for training: all cores on a quiet machine, 1 when the 1-minute load already exceeds the cores.
    An OpenMP team whose threads wait for cores stalls at every barrier (measured here at load 16 on 2 cores: the
    teacher's forward ran at 15 tok/s on 2 threads, 97 tok/s on 1, bf16)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if os.getloadavg()[0] > cores else cores


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `dtype` ('auto' | 'bf16' | 'fp32'): None means plain fp32."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype={dtype!r} is not supported: allowed auto, bf16, fp32")
    if dtype == "fp32":
        return None
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    if dtype == "auto":
        return torch.bfloat16 if native else None
    return torch.bfloat16


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # the teacher's own distribution: what a draft must match
    alpha: float = 1.0  # weight of the soft targets; 0 trains on hard labels only
    divergence: Divergence = Divergence.FORWARD_KL
    seed: int = 0
    dtype: str = "auto"
    freeze_embedding: bool = True  # the (tied) embedding / lm_head stay the teacher's
    checkpoint_every: int = 0  # steps; 0 = only at the end

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("checkpoint_every", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= {low}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is out of range: allowed > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} is out of range: allowed 0..1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} is out of range: allowed > 0")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} is out of range: allowed > 0")
        try:
            object.__setattr__(self, "divergence", Divergence(self.divergence))
        except ValueError:
            raise ValueError(f"divergence={self.divergence!r} is not supported: allowed "
                             f"{', '.join(d.value for d in Divergence)}") from None
        autocast_dtype(self.dtype, torch.device("cpu"))  # validates the name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["divergence"] = self.divergence.value
        return d

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(self.lr, step, self.warmup_steps, self.steps, self.min_lr_ratio)


def warmup_cosine_lr(lr: float, step: int, warmup_steps: int, steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to `lr`, then cosine down to lr * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, batch_size: int, num_windows: int, seed: int) -> torch.Tensor:
    """Window indices of `step`'s batch: epoch e walks a permutation seeded by (seed, e)."""
    first = step * batch_size
    out = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_windows)
        perm = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return torch.tensor(out)


def trainable_parameters(model, freeze_embedding: bool) -> list[tuple[str, torch.nn.Parameter]]:
    params = []
    for name, p in model.named_parameters():  # tied lm_head appears once, as embed_tokens
        frozen = freeze_embedding and name in ("embed_tokens.weight", "lm_head.weight")
        p.requires_grad_(not frozen)
        if not frozen:
            params.append((name, p))
    return params


def _save_state(folder: str, model, optimizer, step: int, config: TrainingConfig, history: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(folder, "student.safetensors"))
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as f:
        json.dump({"step": step, "config": config.to_dict(), "param_groups": state["param_groups"],
                   "history": history}, f, indent=1)


def _load_state(folder: str, model, optimizer, config: TrainingConfig) -> tuple[int, list[dict]]:
    with open(os.path.join(folder, STATE_JSON), encoding="utf-8") as f:
        meta = json.load(f)
    if meta["config"] != config.to_dict():
        changed = sorted(k for k in meta["config"] if meta["config"][k] != config.to_dict().get(k))
        raise ValueError(f"resume: {folder} was trained with different settings ({', '.join(changed)}); "
                         "resume with the same settings or start a new output folder")
    model.load_weights(load_file(os.path.join(folder, "student.safetensors")).items())
    flat = load_file(os.path.join(folder, "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, tensor in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]


def train_student(student, windows: torch.Tensor, teacher: TeacherCache | None, config: TrainingConfig,
                  state_dir: str | None = None, resume: bool = False, stop_at: int | None = None,
                  quiet: bool = False, log_every: int = 10, after_step=None) -> list[dict]:
    """Train `student` in place on windows [N, L] (inputs = window[:-1], labels = window[1:]); with a teacher cache
    (same windows) the loss is Hinton KD, without one hard labels only. Returns the loss history. `stop_at` ends
    early (after saving state) to exercise resume. `after_step()` runs after every optimizer step (e.g. to
    re-apply pruning masks)."""
    if teacher is not None and not torch.equal(teacher.windows, windows):
        raise ValueError("the teacher cache was built over other windows than the ones given")
    device = student.embed_tokens.weight.device
    amp = autocast_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    params = trainable_parameters(student, config.freeze_embedding)
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    step, history = 0, []
    if resume and state_dir and os.path.isfile(os.path.join(state_dir, STATE_JSON)):
        step, history = _load_state(state_dir, student, optimizer, config)
    student.train()
    end = min(config.steps, stop_at if stop_at is not None else config.steps)
    started = time.perf_counter()
    with StepProgress("distilling" if teacher is not None and config.alpha > 0 else "training (hard labels)",
                      config.steps, quiet=quiet) as bar:
        bar.advance(step)
        while step < end:
            idx = batch_indices(step, config.batch_size, windows.shape[0], config.seed)
            batch = windows[idx].to(device)
            top = None
            if teacher is not None and config.alpha > 0:
                t = teacher[idx].positions((slice(None), slice(None, -1)))
                top = type(t)(t.values.to(device), t.indices.to(device),
                              None if t.log_normalizer is None else t.log_normalizer.to(device), t.temperature)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = forward_logits(student, batch[:, :-1])
            loss, parts = distillation_loss(out, batch[:, 1:], top, config.temperature, config.alpha,
                                            config.divergence)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            step += 1
            record = {"step": step, "loss": round(loss.item(), 5), "lr": config.lr_at(step - 1),
                      "grad_norm": round(float(grad_norm), 4), **{k: round(v, 5) for k, v in parts.items()}}
            if step % log_every == 0 or step == end:
                history.append(record)
            bar.advance(1, info=f"loss {record['loss']:.3f} ce {parts['ce']:.3f}")
            if state_dir and config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
                _save_state(state_dir, student, optimizer, step, config, history)
    if state_dir:
        _save_state(state_dir, student, optimizer, step, config, history)
    student.eval()
    for name, p in student.named_parameters():
        p.requires_grad_(False)
    if history:
        history[-1]["elapsed_s"] = round(time.perf_counter() - started, 1)
    return history
