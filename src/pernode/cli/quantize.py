"""`pernode quantize`: quantize a model and write a compressed-tensors checkpoint folder.

A method's flags set its own options (`--damp` is GPTQ's `damp_ratio`); they default to None here, so a flag that
was given to a method that does not take it is an error instead of being dropped."""
from __future__ import annotations

import argparse
import json

from pernode.cli.options import add_model_argument
from pernode.quant_format import QuantScheme
from pernode.serve.models.loader import load_model
from pernode.shrink.checkpoint import checkpoint_bytes, save_quantized
from pernode.shrink.evaluate.perplexity import calibration_windows
from pernode.shrink.methods import METHODS, Modifier, method_class, methods_taking
from pernode.shrink.methods.lm_head import LM_HEAD_SCHEME
from pernode.shrink.recipes import Recipe

# flag -> the method option it sets (its dest); which methods take it follows from their fields
METHOD_FLAGS = {"--act-order": "act_order", "--damp": "damp_ratio", "--observer": "observer", "--alpha": "alpha",
                "--no-clip": "clip", "--outlier-threshold": "threshold"}
# flags that only calibrated methods use
CALIBRATION_FLAGS = {"--calib-windows": "calib_windows", "--calib-seq-len": "calib_seq_len", "--corpus": "corpus",
                     "--calib": "calib"}


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a compressed-tensors checkpoint folder")
    add_model_argument(p)
    p.add_argument("--method", default="rtn", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--bits", type=int, default=8, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=None, help="32, 64 or 128 (default: per output channel)")
    p.add_argument("--asymmetric", action="store_true", help="zero points (default symmetric)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (GPTQ/AWQ/SmoothQuant/LLM.int8(); default 16)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: pydoc topics; first 10%% calibrates)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="your own calibration text (UTF-8): all of it calibrates GPTQ/AWQ/SmoothQuant/LLM.int8()")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the lm_head (untied; int8 per group of 32, GGUF Q8_0's precision); "
                        "default: it stays float")
    p.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by descending Hessian diagonal, group scales fixed up front (default on)")
    p.add_argument("--damp", dest="damp_ratio", type=float, default=None,
                   help="GPTQ: damping, fraction of the mean Hessian diagonal (default 0.01)")
    p.add_argument("--observer", default=None, choices=["minmax", "mse", "hmse"],
                   help="GPTQ group scales: minmax (the group's range), mse (range shrink minimising the group's "
                        "|w - deq(w)|^2.4), hmse (default: mse with each column weighted by its Hessian diagonal)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="SmoothQuant migration strength: 0..1 (default 0.5) or 'auto' (searched per projection)")
    p.add_argument("--no-clip", dest="clip", action="store_const", const=False, default=None,
                   help="AWQ: skip the clip search")
    p.add_argument("--outlier-threshold", dest="threshold", type=float, default=None,
                   help="LLM.int8(): input columns with |x| >= this run in float (default 6.0)")
    p.set_defaults(func=run)


def _alpha(text: str) -> float | str:
    """--alpha: a number (range-checked by the method, with its message) or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha={text!r}: allowed a number in 0..1 or 'auto'") from None


def modifier_from_args(args: argparse.Namespace) -> Modifier:
    """The method with the options its flags gave; a given flag the method does not take is an error naming the
    methods that take it."""
    cls = method_class(args.method)
    options = {}
    for flag, option in METHOD_FLAGS.items():
        value = getattr(args, option)
        if value is None:
            continue
        takers = methods_taking(option)
        if args.method not in takers:
            raise ValueError(f"{flag} applies to --method {' / '.join(takers)} only, not --method {args.method}")
        options[option] = value
    modifier = cls(**options)
    if not modifier.needs_calibration:
        given = [flag for flag, dest in CALIBRATION_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            calibrated = [name for name, c in METHODS.items() if c.needs_calibration]
            raise ValueError(f"{'/'.join(given)} calibrate --method {' / '.join(calibrated)} only; --method "
                             f"{args.method} uses no calibration text")
    return modifier


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    modifier = modifier_from_args(args)
    if modifier.required_scheme is not None:
        if args.bits != 8 or args.group_size or args.asymmetric:
            raise ValueError(f"--method {args.method} runs int8 per-channel symmetric weights x int8 activations: "
                             "drop --bits/--group-size/--asymmetric")
        scheme = modifier.required_scheme
    else:
        scheme = QuantScheme(num_bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric)
    lm_head = LM_HEAD_SCHEME if args.quantize_lm_head else None
    name = f"{modifier.name}-{scheme.label()}" + (f"+lm_head-{lm_head.label()}" if lm_head else "")
    return Recipe(name, scheme, modifier, lm_head)


def _given(value, default):
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    model, source = load_model(args.model)
    calib = None
    if recipe.needs_calibration:
        if args.calib and args.corpus:
            raise ValueError("--calib FILE (all of it calibrates) and --corpus FILE (its first 10% calibrates) "
                             "are alternatives: give one")
        calib = calibration_windows(source.tokenizer, _given(args.calib_seq_len, 512), _given(args.calib_windows, 16),
                                    args.corpus, args.calib)
    report = recipe.apply(model, calib)
    save_quantized(model, source, args.out, recipe, details={k: v for k, v in report.items() if k != "outliers"})
    if report.get("outliers"):
        print("LLM.int8() outlier input columns (|x| >= %.1f) per layer on the calibration text:" % report["threshold"])
        for name, st in report["outliers"].items():
            print(f"  {name:32s} mean {st['mean_outlier_columns']:6.1f}  max {st['max_outlier_columns']:4d}"
                  f"  of {st['in_features']}")
        with open(f"{args.out}/outlier_stats.json", "w") as f:
            json.dump(report["outliers"], f, indent=1)
    head = " + int8-g32 lm_head" if recipe.lm_head else ""
    print(f"wrote {args.out} ({checkpoint_bytes(args.out) / 1e6:.1f} MB of weights, {recipe.scheme.label()}{head}, "
          f"{recipe.method})")
    return 0
