"""Continue the KD of a `pernode distill` student for more steps, on the teacher cache its run left behind: the same
windows and teacher top-k, a new batch order (--seed), a fresh warmup + cosine schedule at --lr. For students whose
loss was still falling at the end of their run (structured pruning + KD, docs/pruning.md), without paying for the
teacher pass again.

    PYTHONPATH=src .venv/bin/python benchmarks/kd_continue.py --student ckpt/kd-ffn960 --out ckpt/kd-ffn960-c2 \
        --steps 240 --lr 1.5e-4 --seed 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.student_checkpoint import save_student
from pernode.shrink.distill.teacher_cache import TeacherCache
from pernode.shrink.distill.trainer import TrainingConfig, train_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="a `pernode distill` output folder (holds teacher_cache/)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=1, help="batch order; the first run's was its --seed (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.student, "distill.json"), encoding="utf-8") as f:
        first = json.load(f)
    previous = {k: v for k, v in first["config"]["training"].items() if k in
                {f.name for f in dataclasses.fields(TrainingConfig)}}
    config = TrainingConfig(**{**previous, "steps": args.steps, "lr": args.lr, "seed": args.seed,
                               "warmup_steps": min(previous.get("warmup_steps", 10), args.steps),
                               "checkpoint_every": args.checkpoint_every})
    cache = TeacherCache.load(os.path.join(args.student, "teacher_cache"))
    student, source = load_model(args.student)
    started = time.perf_counter()
    history = train_student(student, cache.windows, cache, config, os.path.join(args.out, "train_state"),
                            args.resume)
    details = {"continued_from": os.path.abspath(args.student), "training": config.to_dict(),
               "history_kd": history, "train_s_kd": round(time.perf_counter() - started, 1),
               "first_run": {k: first.get(k) for k in ("config", "train_s_kd", "perplexity_pydoc", "param_ratio",
                                                       "student_non_embedding_params")}}
    save_student(student, source, args.out, details=details)
    print(f"student checkpoint: {args.out}")


if __name__ == "__main__":
    main()
