"""`pernode quantize`: quantize a model and write a compressed-tensors checkpoint folder."""
from __future__ import annotations

import argparse
import json

from pernode.cli.options import add_model_argument
from pernode.quant_format import QuantScheme
from pernode.shrink import CALIBRATED, METHODS, quantize_model
from pernode.shrink.checkpoint import checkpoint_bytes, load_model, save_quantized
from pernode.shrink.evaluate.perplexity import calibration_windows
from pernode.shrink.methods.lm_head import quantize_lm_head


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a compressed-tensors checkpoint folder")
    add_model_argument(p)
    p.add_argument("--method", default="rtn", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--bits", type=int, default=8, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=None, help="32, 64 or 128 (default: per output channel)")
    p.add_argument("--asymmetric", action="store_true", help="zero points (default symmetric)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows (GPTQ/AWQ/SmoothQuant)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: pydoc topics; first 10%% calibrates)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="your own calibration text (UTF-8): all of it calibrates GPTQ/AWQ/SmoothQuant/LLM.int8()")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the lm_head (untied; int8 per group of 32, GGUF Q8_0's precision); "
                        "default: it stays float")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns by descending Hessian diagonal, group scales fixed up front (default on)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, fraction of the mean Hessian diagonal")
    p.add_argument("--observer", default="hmse", choices=["minmax", "mse", "hmse"],
                   help="GPTQ group scales: minmax (the group's range), mse (range shrink minimising the group's "
                        "|w - deq(w)|^2.4), hmse (default: mse with each column weighted by its Hessian diagonal)")
    p.add_argument("--alpha", type=_alpha, default=0.5,
                   help="SmoothQuant migration strength: 0..1 (default 0.5) or 'auto' (searched per projection)")
    p.add_argument("--no-clip", action="store_true", help="AWQ: skip the clip search")
    p.set_defaults(func=run)


def _alpha(text: str) -> float | str:
    """--alpha: a number (range-checked by the method, with its message) or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha={text!r}: allowed a number in 0..1 or 'auto'") from None


def run(args: argparse.Namespace) -> int:
    w8a8 = args.method in ("smoothquant", "w8a8", "llm-int8")
    if w8a8 and (args.bits != 8 or args.group_size or args.asymmetric):
        raise ValueError(f"--method {args.method} runs int8 per-channel symmetric weights x int8 activations: "
                         "drop --bits/--group-size/--asymmetric")
    scheme = QuantScheme(num_bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric,
                         activations="int8-token" if w8a8 else None)
    model, source = load_model(args.model)
    calib = None
    if args.method in CALIBRATED:
        if args.calib and args.corpus:
            raise ValueError("--calib FILE (all of it calibrates) and --corpus FILE (its first 10% calibrates) "
                             "are alternatives: give one")
        calib = calibration_windows(source.tokenizer, args.calib_seq_len, args.calib_windows, args.corpus,
                                    args.calib)
    options = {"act_order": args.act_order, "damp_ratio": args.damp, "observer": args.observer, "alpha": args.alpha,
               "clip": not args.no_clip}
    report = quantize_model(model, args.method, scheme, calib, **options)
    if args.quantize_lm_head:
        quantize_lm_head(model)
    save_quantized(model, source, args.out, scheme, args.method, extra={k: v for k, v in report.items()
                                                                         if k != "outliers"})
    if report.get("outliers"):
        print("LLM.int8() outlier input columns (|x| >= %.1f) per layer on the calibration text:" % report["threshold"])
        for name, st in report["outliers"].items():
            print(f"  {name:32s} mean {st['mean_outlier_columns']:6.1f}  max {st['max_outlier_columns']:4d}"
                  f"  of {st['in_features']}")
        with open(f"{args.out}/outlier_stats.json", "w") as f:
            json.dump(report["outliers"], f, indent=1)
    head = " + int8-g32 lm_head" if args.quantize_lm_head else ""
    print(f"wrote {args.out} ({checkpoint_bytes(args.out) / 1e6:.1f} MB of weights, {scheme.label()}{head}, "
          f"{args.method})")
    return 0
