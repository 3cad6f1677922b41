"""`pernode prune`: prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M; uniform or OWL per layer),
optionally quantize the survivors, and write a compressed-tensors sparse checkpoint folder.

A method's flags set its own options; they default to None here, so a flag given to a method that does not take it
is an error instead of being dropped (as `pernode quantize`)."""
from __future__ import annotations

import argparse
import logging

from pernode.cli.options import add_model_argument
from pernode.quant_format import QuantScheme
from pernode.serve.kernels.sparse_linear import MIN_SPARSITY
from pernode.serve.models.loader import load_model
from pernode.shrink.checkpoint import checkpoint_bytes, save_checkpoint
from pernode.shrink.evaluate.perplexity import calibration_windows
from pernode.shrink.pruning.calibration_text import held_out_windows
from pernode.shrink.methods import GPTQ, RTN
from pernode.shrink.pruning import PRUNERS, pruner_named
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


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.calib_windows is not None and not recipe.needs_calibration:
        raise ValueError(f"--calib-windows: --method {args.method} with --layerwise {args.layerwise} uses no "
                         "calibration text")
    model, source = load_model(args.model)
    calib = None
    if recipe.needs_calibration:
        if args.corpus is None:  # the calibration split alone holds ~10k tokens: add the text eval ppl never scores
            calib = held_out_windows(source.tokenizer, args.calib_seq_len, args.calib_windows or 97)
        else:
            calib = calibration_windows(source.tokenizer, args.calib_seq_len, args.calib_windows or 97, args.corpus)
    report = recipe.apply(model, calib)
    folder = save_checkpoint(model, source, args.out, recipe, details=report)
    layers = report["pruning"]["layer_sparsity"]
    print(f"wrote {args.out} ({checkpoint_bytes(folder) / 1e6:.1f} MB of weights, {recipe.label}, {recipe.method}); "
          f"layer sparsity {min(layers):.0%}..{max(layers):.0%}")
    if recipe.scheme is not None:
        print("served: the zeros are stored as quantized values and run the dense int kernels "
              "(no speedup from sparsity; the size gain is the quantization's)")
    elif recipe.pruner.sparsity < MIN_SPARSITY:
        print(f"served: no speedup at this sparsity ({recipe.pruner.sparsity:.0%} < {MIN_SPARSITY:.0%}, where the "
              "bitmask GEMV measured faster than dense): the engine runs these weights dense")
    else:
        print(f"served: decode steps run the bitmask GEMV (measured faster than dense from {MIN_SPARSITY:.0%} "
              "sparsity at small batches; larger batches run dense GEMMs)")
    logging.getLogger("pernode").debug("prune report: %s", report)
    return 0
