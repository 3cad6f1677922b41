"""`pernode distill` (a smaller student from the served model by knowledge distillation) and `pernode
prune-structured` (heads, KV groups, FFN channels, layers removed by activation importance; recover with distill)."""
from __future__ import annotations

import argparse
import json
import os

import torch

from pernode.cli.options import add_model_argument, int_list
from pernode.jobs.distillation import run_distillation
from pernode.measure.bench.datasets import CHAT_MIX
from pernode.serve.models.loader import load_model
from pernode.shrink.distill import DistillConfig, StudentSpec, TrainingConfig
from pernode.shrink.distill.draft_vocab import build_draft_vocab
from pernode.shrink.distill.eagle_training import EagleTrainingConfig, train_eagle_head
from pernode.shrink.distill.student_checkpoint import save_student
from pernode.shrink.distill.trainer import training_threads
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.shrink.structured import PruningPlan, measure_importance, prune_model
from pernode.shrink.structured.plan import non_embedding_params

# --quick: a run that fits in a few minutes on a quiet 2-core node
QUICK = dict(steps=40, batch_size=4, seq_len=128, seq_kd_prompts=16, seq_kd_max_tokens=64, eval_windows=4)
FULL = dict(steps=300, batch_size=8, seq_len=256, seq_kd_prompts=64, seq_kd_max_tokens=128, eval_windows=16)


def add_parsers(sub) -> None:
    p = sub.add_parser("distill", help="distill a smaller student from a model (Hinton KD, top-k teacher cache)")
    add_model_argument(p, "the teacher: known name, a .gguf file or a Hugging Face folder")
    p.add_argument("--out", required=True, help="output folder: the student checkpoint (served like any model)")
    g = p.add_argument_group("student")
    g.add_argument("--layers", default=None, help="teacher layer indices to copy, e.g. 0,4,8,12,17,21,25,29")
    g.add_argument("--keep-layers", type=int, default=None, help="number of teacher layers to keep (default 8)")
    g.add_argument("--layer-choice", default="even", choices=["even", "importance"],
                   help="--keep-layers picks evenly spaced layers or those of highest block importance")
    g.add_argument("--structured", default=None, metavar="SPEC",
                   help="narrower student by structured pruning first: heads=N,kv_heads=N,ffn=N (layers=N keeps "
                        "the N most important layers)")
    g.add_argument("--refit-windows", type=int, default=0,
                   help="with --structured: 256-token calibration windows for the least-squares refit of "
                        "o_proj/down_proj before KD (0: none; e.g. 16 for ffn=1024)")
    g.add_argument("--init-student", default=None, metavar="DIR",
                   help="train this saved student (e.g. a finished KD run, on fresh text) instead of building one")
    g.add_argument("--train-embedding", dest="freeze_embedding", action="store_false",
                   help="train the (tied) embedding / lm_head too (default: shared with the teacher, frozen)")
    g = p.add_argument_group("loss")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="soft-target temperature (1: the teacher's own distribution, what a draft must match)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="weight of the soft targets, 1 - alpha on hard labels (0: hard labels only)")
    g.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl"])
    g.add_argument("--top-k", type=int, default=64, help="teacher logits cached per position")
    g.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="also write draft_vocab.json: the N most frequent tokens, a reduced head when the student "
                        "serves as a speculative draft (FR-Spec; 0: none)")
    g.add_argument("--no-hard-baseline", dest="hard_label_baseline", action="store_false",
                   help="skip training the same student on hard labels at equal steps")
    g = p.add_argument_group("data and training")
    g.add_argument("--quick", action="store_true", help=f"a few minutes: {QUICK}")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--stdlib-text", default="files", choices=["files", "docstrings", "none"],
                   help="the stdlib part of the training text: whole .py files (mostly code), their docstrings "
                        "only (English prose, nearest to the pydoc evaluation text) or none")
    g.add_argument("--docstring-packages", type=lambda s: tuple(p for p in s.split(",") if p), default=(),
                   metavar="NAMES", help="installed packages whose docstrings are training text too, e.g. "
                                         "numpy,torch,networkx,matplotlib (each recorded with its version)")
    g.add_argument("--seq-kd-prompts", type=int, default=None,
                   help="chat prompts the teacher answers for sequence-level KD (0: none)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the CPU has native bf16 (AVX512_BF16/AMX), else fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable states (0: end only)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state with the same settings")
    g.add_argument("--threads", dest="num_threads", type=int, default=None,
                   help="CPU threads (default: all cores, 1 when the load already exceeds them)")
    g.add_argument("--eval-windows", type=int, default=None, help="512-token windows of held-out perplexity")
    g.add_argument("--no-speed", dest="measure_speed", action="store_false", help="skip the decode-speed runs")
    p.set_defaults(func=run)

    p = sub.add_parser("draft-vocab", help="give a draft model a reduced-vocabulary head (FR-Spec): the N tokens the "
                                           "teacher's replies and the training text use most")
    add_model_argument(p, "the teacher (the served model)")
    p.add_argument("--draft", required=True, help="the draft's folder; draft_vocab.json is written there")
    p.add_argument("--size", type=int, default=8192, help="tokens the draft scores (1..vocab size)")
    p.add_argument("--prompts", type=int, default=64, help="chat prompts the teacher answers for the counts")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per teacher reply")
    p.set_defaults(func=run_draft_vocab)

    # The defaults are the best measured recipe (docs/distillation.md, "The EAGLE head on general chat"): about
    # 40 minutes on a 2-core CPU with --threads 2, most of it answering the prompts (kept by --replies-cache).
    p = sub.add_parser("draft-head", help="train an EAGLE draft head on the served model's own features (for "
                                          "--speculative eagle=OUT)")
    add_model_argument(p, "the served model (the head reads its hidden states)")
    p.add_argument("--out", required=True, help="folder for head.safetensors + head.json")
    p.add_argument("--chat-prompts", type=int, default=128,
                   help="training chat prompts about stdlib modules the served model answers")
    p.add_argument("--general-prompts", type=int, default=1200,
                   help="general chat prompts the served model answers (facts, e-mails, summaries, code, ...)")
    p.add_argument("--replies-cache", default=None, metavar="FILE",
                   help="JSON file keeping the served model's replies between runs (only new prompts are answered)")
    p.add_argument("--chat-max-tokens", type=int, default=192, help="tokens per reply")
    p.add_argument("--text-tokens", type=int, default=20000, help="pydoc/stdlib tokens beside the replies")
    p.add_argument("--eval-prompts", type=int, default=12,
                   help="held-out chat prompts of each kind (stdlib modules; general with --general-prompts) for the "
                        "acceptance figure")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--depth", type=int, default=2,
                   help="drafts unrolled on the head's own predictions in training (EAGLE-3's training-time test)")
    p.add_argument("--kd-weight", type=float, default=0.1, help="weight of the top-k KL beside the feature loss")
    p.add_argument("--token-weight", type=float, default=1.0,
                   help="weight of a cross-entropy to the served model's greedy token over the tokens the head "
                        "drafts (--draft-vocab's, else all)")
    p.add_argument("--draft-vocab", type=int, default=8192, metavar="N",
                   help="also write draft_vocab.json: the N tokens the replies and text use most (FR-Spec; 0: none)")
    p.add_argument("--k-eval", type=int, default=4, help="drafts chained in the teacher-forced acceptance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run_draft_head)

    p = sub.add_parser("prune-structured",
                       help="remove heads/KV groups/FFN channels/layers by activation importance (Minitron)")
    add_model_argument(p)
    p.add_argument("--structured", required=True, metavar="SPEC", help="heads=N,kv_heads=N,ffn=N,layers=N")
    p.add_argument("--out", required=True, help="output folder (a dense checkpoint the engine serves)")
    p.add_argument("--calib-windows", type=int, default=8, help="256-token windows of pydoc calibration text")
    p.add_argument("--refit-windows", type=int, default=0,
                   help="256-token calibration windows for the least-squares refit of o_proj/down_proj (0: none; "
                        "at least 2 tokens per kept channel, e.g. 16 for ffn=1024)")
    p.add_argument("--eval-windows", type=int, default=16, help="512-token windows of held-out perplexity (0: skip)")
    p.set_defaults(func=run_prune)


def _pick(value, quick: bool, key: str):
    return value if value is not None else (QUICK if quick else FULL)[key]


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    width = PruningPlan.parse(args.structured) if args.structured else PruningPlan()
    layers = tuple(int_list(args.layers)) if args.layers else None
    keep, choice = args.keep_layers, args.layer_choice
    if width.layers is not None:
        if layers is not None or keep is not None:
            raise ValueError("--structured layers=N and --layers/--keep-layers both choose layers: give one")
        keep, choice = width.layers, "importance"
        width = PruningPlan(heads=width.heads, kv_heads=width.kv_heads, ffn=width.ffn)
    if layers is None and keep is None and width.is_identity:
        keep = 8
    student = StudentSpec(layers=layers, keep_layers=keep, layer_choice=choice, width=width,
                          refit_windows=args.refit_windows)
    steps = _pick(args.steps, args.quick, "steps")
    training = TrainingConfig(steps=steps, batch_size=_pick(args.batch_size, args.quick, "batch_size"), lr=args.lr,
                              warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20),
                              grad_clip=args.grad_clip, temperature=args.temperature, alpha=args.alpha,
                              divergence=args.divergence, seed=args.seed, dtype=args.dtype,
                              freeze_embedding=args.freeze_embedding, checkpoint_every=args.checkpoint_every)
    return DistillConfig(teacher=args.model, out=args.out, student=student, training=training,
                         seq_len=_pick(args.seq_len, args.quick, "seq_len"), stdlib_text=args.stdlib_text,
                         docstring_packages=args.docstring_packages, init_student=args.init_student, top_k=args.top_k,
                         seq_kd_prompts=_pick(args.seq_kd_prompts, args.quick, "seq_kd_prompts"),
                         seq_kd_max_tokens=(QUICK if args.quick else FULL)["seq_kd_max_tokens"],
                         eval_windows=_pick(args.eval_windows, args.quick, "eval_windows"),
                         hard_label_baseline=args.hard_label_baseline, resume=args.resume,
                         draft_vocab=args.draft_vocab,
                         num_threads=args.num_threads)


def run(args: argparse.Namespace) -> int:
    result = run_distillation(config_from_args(args), measure_speed=args.measure_speed)
    summary = {k: result[k] for k in ("student_layers", "param_ratio", "perplexity_pydoc",
                                      "perplexity_stdlib_heldout", "kd_improvement_pct", "decode", "elapsed_s")
               if k in result}
    print(json.dumps(summary, indent=1))
    print(f"student checkpoint: {args.out} (serve it: pernode generate --model {args.out})")
    return 0


def run_draft_vocab(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.draft):
        raise ValueError(f"--draft {args.draft!r} is not a folder: give the draft checkpoint's folder")
    details = build_draft_vocab(args.model, args.draft, args.size, args.prompts, args.max_tokens)
    print(json.dumps(details, indent=1))
    return 0


def run_draft_head(args: argparse.Namespace) -> int:
    config = EagleTrainingConfig(teacher=args.model, out=args.out, chat_prompts=args.chat_prompts,
                                 general_prompts=args.general_prompts, replies_cache=args.replies_cache,
                                 chat_max_tokens=args.chat_max_tokens, text_tokens=args.text_tokens,
                                 eval_prompts=args.eval_prompts, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, depth=args.depth, kd_weight=args.kd_weight,
                                 token_weight=args.token_weight, draft_vocab=args.draft_vocab,
                                 k_eval=args.k_eval,
                                 seed=args.seed, threads=args.threads)
    # the benchmark's chat prompts are its evaluation set: never trained on
    details = train_eagle_head(config, excluded_prompts=tuple(text for text, _ in CHAT_MIX))
    print(json.dumps({k: details[k] for k in ("acceptance", "features_s", "train_s", "elapsed_s")}, indent=1))
    return 0


def run_prune(args: argparse.Namespace) -> int:
    plan = PruningPlan.parse(args.structured)
    torch.set_num_threads(training_threads())
    model, source = load_model(args.model)
    plan.target_config(model.config)  # the shapes are checked before any work
    calibration = calibration_windows(source.tokenizer, 256, max(args.calib_windows, args.refit_windows))
    importance = measure_importance(model, calibration[:args.calib_windows])
    pruned = prune_model(model, plan, importance,
                         refit_windows=calibration[:args.refit_windows] if args.refit_windows else None)
    details = {"teacher": args.model, "plan": plan.to_dict(), "calib_windows": args.calib_windows,
               "refit_windows": args.refit_windows,
               "teacher_non_embedding_params": non_embedding_params(model.config),
               "pruned_non_embedding_params": non_embedding_params(pruned.config)}
    details["param_ratio"] = round(details["pruned_non_embedding_params"] / details["teacher_non_embedding_params"], 4)
    if args.eval_windows:
        details["perplexity_pydoc"] = {
            name: round(evaluate_perplexity(m, source.tokenizer, 512, args.eval_windows).perplexity, 4)
            for name, m in (("teacher", model), ("pruned", pruned))}
    save_student(pruned, source, args.out, details=details)
    with open(os.path.join(args.out, "prune.json"), "w", encoding="utf-8") as f:
        json.dump(details, f, indent=1)
    print(json.dumps(details, indent=1))
    return 0
