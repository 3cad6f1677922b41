"""`pernode prune`: prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M; uniform or OWL per layer),
optionally recover the survivors by KD from the dense model (masks fixed), optionally quantize them, and write a
compressed-tensors sparse checkpoint folder. The order is prune -> KD recovery -> quantize: with `--recover-kd` and
`--quantize gptq`, GPTQ runs on the recovered weights (a second calibration pass) instead of jointly with SparseGPT.

A method's flags set its own options; they default to None here, so a flag given to a method that does not take it
is an error instead of being dropped (as `pernode quantize`)."""
from __future__ import annotations

import argparse
import logging
import os

import torch

from pernode.cli.options import add_model_argument
from pernode.quant_format import QuantScheme
from pernode.serve.kernels.sparse_linear import sparse_gate
from pernode.serve.models.loader import load_model
from pernode.shrink.checkpoint import checkpoint_bytes, save_checkpoint
from pernode.shrink.evaluate.perplexity import DEFAULT_SEQ_LEN, calibration_windows, evaluate_perplexity
from pernode.shrink.methods import GPTQ, RTN, quantize_model
from pernode.shrink.pruning import PRUNERS, pruner_named
from pernode.shrink.pruning.calibration_text import held_out_windows
from pernode.shrink.distill.sparse_recovery import KDRecovery, kd_windows, recover, teacher_cache
from pernode.shrink.recipes import Recipe

# flag -> the pruner option it sets; which methods take it follows from their fields
PRUNER_FLAGS = {"--damp": "damp_ratio", "--block-size": "block_size", "--owl-threshold": "owl_threshold",
                "--owl-spread": "owl_spread"}
QUANTIZERS = {"gptq": GPTQ, "rtn": RTN}


def add_parsers(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, Wanda, SparseGPT) and write a sparse checkpoint")
    add_model_argument(p)
    p.add_argument("--method", default="sparsegpt", help=f"one of {', '.join(PRUNERS)} (default sparsegpt)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each projection's weights set to zero")
    p.add_argument("--pattern", default="unstructured", help="N:M such as 2:4 or 4:8 (default unstructured)")
    p.add_argument("--layerwise", default="uniform", choices=["uniform", "owl", "sensitivity"],
                   help="per-layer sparsity: uniform, owl (by each layer's outlier ratio) or sensitivity (by its "
                        "block importance on calibration text); the mean stays the target")
    p.add_argument("--owl-threshold", dest="owl_threshold", type=float, default=None,
                   help="OWL: an outlier scores this many times its layer's mean (default 5)")
    p.add_argument("--owl-spread", dest="owl_spread", type=float, default=None,
                   help="owl / sensitivity: layers' sparsities within target +- this (default 0.08)")
    p.add_argument("--damp", dest="damp_ratio", type=float, default=None,
                   help="SparseGPT: damping, fraction of the mean Hessian diagonal (default 0.01)")
    p.add_argument("--block-size", dest="block_size", type=int, default=None,
                   help="SparseGPT: columns per mask-selection block (default 128)")
    p.add_argument("--quantize", default=None, choices=sorted(QUANTIZERS),
                   help="then quantize the survivors: gptq (in the same pass as SparseGPT) or rtn")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="with --quantize (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="with --quantize: 32, 64 or 128 (default 64)")
    p.add_argument("--calib-windows", type=int, default=None, help="calibration windows of --calib-seq-len tokens "
                   "(default 97, ~50k tokens: the pydoc calibration split plus the pydoc text after the windows "
                   "`eval ppl` scores; magnitude uses none unless --layerwise owl)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: pydoc topics; first 10%% calibrates)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("KD recovery (prune, then distill from the dense model with the masks fixed)")
    g.add_argument("--recover-kd", dest="recover_kd", type=int, default=0, metavar="STEPS",
                   help="distill the pruned model from the dense one for STEPS optimizer steps before any "
                        "quantization (0: one-shot, the default); pruned weights stay exactly zero")
    g.add_argument("--kd-lr", type=float, default=KDRecovery.lr, help=f"(default {KDRecovery.lr:g})")
    g.add_argument("--kd-batch-size", type=int, default=KDRecovery.batch_size,
                   help=f"windows per step (default {KDRecovery.batch_size})")
    g.add_argument("--kd-seq-len", type=int, default=KDRecovery.seq_len,
                   help=f"tokens per window (default {KDRecovery.seq_len})")
    g.add_argument("--kd-top-k", type=int, default=KDRecovery.top_k,
                   help=f"teacher logits cached per position (default {KDRecovery.top_k})")
    g.add_argument("--resume", action="store_true",
                   help="continue the KD from OUT/kd_recovery/train_state (same settings; the pruning is rerun)")
    g.add_argument("--threads", dest="num_threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--eval-windows", type=int, default=0,
                   help=f"also print the fixed-protocol perplexity ({DEFAULT_SEQ_LEN}-token windows) after pruning "
                        "and at the end (0: none; 16 for decisions)")
    p.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    options = {"sparsity": args.sparsity, "pattern": args.pattern, "layerwise": args.layerwise}
    for flag, option in PRUNER_FLAGS.items():
        value = getattr(args, option)
        if value is None:
            continue
        takers = [name for name, cls in PRUNERS.items() if option in {f for f in cls.__dataclass_fields__}]
        if args.method not in takers:
            raise ValueError(f"{flag} applies to --method {' / '.join(takers)} only, not --method {args.method}")
        options[option] = value
    pruner = pruner_named(args.method, **options)
    if args.quantize is None:
        return Recipe(f"{pruner.name}-{pruner.label()}", pruner=pruner)
    scheme = QuantScheme(num_bits=args.bits, group_size=args.group_size)
    modifier = QUANTIZERS[args.quantize]()
    return Recipe(f"{pruner.name}-{pruner.label()}+{modifier.name}-{scheme.label()}", scheme, modifier,
                  pruner=pruner)


def kd_recovery_from_args(args: argparse.Namespace) -> KDRecovery | None:
    if args.recover_kd < 0:
        raise ValueError(f"--recover-kd={args.recover_kd}: allowed >= 0 (0: no KD recovery)")
    if not args.recover_kd:
        return None
    return KDRecovery(steps=args.recover_kd, batch_size=args.kd_batch_size, seq_len=args.kd_seq_len, lr=args.kd_lr,
                      top_k=args.kd_top_k)


def _ppl(model, tokenizer, windows: int, what: str, report: dict) -> None:
    if windows:
        ppl = round(evaluate_perplexity(model, tokenizer, max_windows=windows).perplexity, 4)
        report.setdefault("perplexity", {})[what] = ppl
        print(f"perplexity {what}: {ppl} ({windows} x {DEFAULT_SEQ_LEN} tokens)", flush=True)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    recovery = kd_recovery_from_args(args)
    if args.eval_windows < 0:
        raise ValueError(f"--eval-windows={args.eval_windows}: allowed >= 0")
    if args.calib_windows is not None and not recipe.needs_calibration:
        raise ValueError(f"--calib-windows: --method {args.method} with --layerwise {args.layerwise} uses no "
                         "calibration text")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    model, source = load_model(args.model)
    tokenizer = source.tokenizer
    calib = None
    if recipe.needs_calibration:
        if args.corpus is None:  # the calibration split alone holds ~10k tokens: add the text eval ppl never scores
            calib = held_out_windows(tokenizer, args.calib_seq_len, args.calib_windows or 97)
        else:
            calib = calibration_windows(tokenizer, args.calib_seq_len, args.calib_windows or 97, args.corpus)
    if recovery is None:
        report = recipe.apply(model, calib)
        _ppl(model, tokenizer, args.eval_windows, "pruned", report)
    else:
        report = prune_recover_quantize(model, source, recipe, recovery, calib, args)
    folder = save_checkpoint(model, source, args.out, recipe, details=report)
    layers = report["pruning"]["layer_sparsity"]
    print(f"wrote {args.out} ({checkpoint_bytes(folder) / 1e6:.1f} MB of weights, {recipe.label}, {recipe.method}); "
          f"layer sparsity {min(layers):.0%}..{max(layers):.0%}")
    if recipe.scheme is not None:
        print("served: the zeros are stored as quantized values and run the dense int kernels "
              "(no speedup from sparsity; the size gain is the quantization's)")
    elif (gate := sparse_gate()) is None:
        print("served: dense here (the bitmask GEMV has no AVX2 or AVX-512 path on this CPU)")
    elif recipe.pruner.sparsity < gate.min_sparsity:
        print(f"served: no speedup at this sparsity ({recipe.pruner.sparsity:.0%} < {gate.min_sparsity:.0%}, where "
              f"the bitmask GEMV measured faster than dense with {gate.vector_unit}): the engine runs these weights "
              "dense on this CPU")
    else:
        print(f"served: decode steps run the bitmask GEMV (measured faster than dense from {gate.min_sparsity:.0%} "
              f"sparsity with {gate.vector_unit}, up to {gate.max_rows} rows; larger batches run dense GEMMs)")
    logging.getLogger("pernode").debug("prune report: %s", report)
    return 0


def prune_recover_quantize(model, source, recipe: Recipe, recovery: KDRecovery, calib, args) -> dict:
    """The teacher's logits on the KD text (the dense model, before pruning), then prune, distill with the masks
    fixed, then quantize the recovered survivors (a separate GPTQ / RTN pass on the recovered weights)."""
    tokenizer = source.tokenizer
    work = os.path.join(args.out, "kd_recovery")
    windows, provenance = kd_windows(tokenizer, recovery)
    cache = teacher_cache(model, windows, os.path.join(work, "teacher_cache"), recovery, source.path)
    report = {"pruning": recipe.pruner.apply(model, calib)}
    _ppl(model, tokenizer, args.eval_windows, "pruned", report)
    kd = recover(model, windows, cache, recovery, os.path.join(work, "train_state"), args.resume)
    kd["data"] = provenance
    report["kd_recovery"] = kd
    first, last = kd["history"][0], kd["history"][-1]
    print(f"KD recovery: {recovery.steps} steps, {kd['tokens']} tokens, loss {first['loss']:.3f} (step "
          f"{first['step']}) -> {last['loss']:.3f}, {kd['train_s'] / 60:.1f} min", flush=True)
    _ppl(model, tokenizer, args.eval_windows, "pruned+kd", report)
    if recipe.modifier is not None:
        report.update(quantize_model(model, recipe.modifier, recipe.scheme, calib))
        _ppl(model, tokenizer, args.eval_windows, "pruned+kd+quantized", report)
    return report
