"""Pruning quality on the default model, measured in one run: perplexity of each pruning recipe beside fp32 on the
fixed protocol of `pernode eval ppl` (evaluation split of the pydoc topics, windows of 2048 tokens, 16 windows for
decisions), with the calibration time of each method. Calibration: 97 windows of 512 tokens (~50k) of pydoc text
that the evaluation does not score (`shrink/pruning/calibration_text.py`).

Choosing settings (`--select K`): the last K calibration windows are held out of the calibration and scored
instead of the evaluation split, so options are chosen on calibration text and the evaluation stays untouched;
report the chosen setting on the 16-window protocol afterwards (without --select).

A recipe name may carry option overrides of its pruner or quantizer after '@', e.g.
`sparsegpt-50-owl@owl_spread=0.12,owl_threshold=7` or `sparsegpt-50@damp_ratio=0.05,block_size=64`.

    PYTHONPATH=src .venv/bin/python benchmarks/pruning_quality.py --recipes fp32,magnitude-50,wanda-50,sparsegpt-50
    PYTHONPATH=src .venv/bin/python benchmarks/pruning_quality.py --recipes sparsegpt-2:4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.evaluate.perplexity import evaluate_perplexity, window_nll
from pernode.shrink.pruning.calibration_text import held_out_windows
from pernode.shrink.recipes import PRUNED_RECIPES, RECIPES

PRUNING_RECIPES = {"fp32": RECIPES["fp32"], **PRUNED_RECIPES}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def recipe_of(name: str):
    """The recipe `name`, with the '@key=value,...' overrides applied to whichever of its pruner / modifier has
    the option; SystemExit naming the option and the allowed ones otherwise."""
    base, _, overrides = name.partition("@")
    if base not in PRUNING_RECIPES:
        raise SystemExit(f"--recipes: unknown {base!r}: allowed {', '.join(PRUNING_RECIPES)}")
    recipe = PRUNING_RECIPES[base]
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        for part in ("pruner", "modifier"):
            obj = getattr(recipe, part)
            if obj is not None and key in {f.name for f in dataclasses.fields(obj)}:
                recipe = dataclasses.replace(recipe, **{part: dataclasses.replace(obj, **{key: _value(value)})})
                break
        else:
            raise SystemExit(f"--recipes {name}: {key!r} is no option of its pruner or quantizer")
    return dataclasses.replace(recipe, name=name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="fp32,magnitude-50,wanda-50,sparsegpt-50",
                    help=f"comma list (';' when overrides are given) of {', '.join(PRUNING_RECIPES)}")
    ap.add_argument("--calib-windows", type=int, default=97, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--seq-len", type=int, default=2048, help="evaluation window length")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length")
    ap.add_argument("--select", type=int, default=0, metavar="K",
                    help="score the last K calibration windows, held out of the calibration, instead of the "
                         "evaluation split (for choosing settings; 0: the evaluation protocol)")
    args = ap.parse_args()
    if args.select < 0 or args.select >= args.calib_windows:
        raise SystemExit(f"--select {args.select}: allowed 0 <= K < --calib-windows ({args.calib_windows})")
    names = [n.strip() for n in args.recipes.split(";" if "@" in args.recipes else ",") if n.strip()]
    recipes = [recipe_of(n) for n in names]
    rows, calib, selection = [], None, None
    print(f"load {os.getloadavg()[0]:.1f}", flush=True)
    for name, recipe in zip(names, recipes):
        model, source = load_model(args.model)
        started = time.perf_counter()
        if recipe.needs_calibration and calib is None:
            calib = held_out_windows(source.tokenizer, args.calib_seq_len, args.calib_windows, args.seq_len,
                                     args.windows)
            if args.select:
                calib, selection = calib[:-args.select], calib[-args.select:]
        report = recipe.apply(model, calib)
        prune_s = time.perf_counter() - started
        if args.select:
            if selection is None:  # a first recipe without calibration (fp32) still needs the held-out windows
                windows = held_out_windows(source.tokenizer, args.calib_seq_len, args.calib_windows, args.seq_len,
                                           args.windows)
                selection = windows[-args.select:]
            nll = [window_nll(model, w) for w in selection]
            perplexity = math.exp(sum(s for s, _ in nll) / sum(n for _, n in nll))
        else:
            perplexity = evaluate_perplexity(model, source.tokenizer, seq_len=args.seq_len,
                                             max_windows=args.windows).perplexity
        row = {"name": name, "label": recipe.label, "ppl": perplexity, "calib_tokens": 0 if calib is None
               or not recipe.needs_calibration else calib.numel(), "prune_s": round(prune_s, 1),
               "layer_sparsity": report.get("pruning", {}).get("layer_sparsity")}
        rows.append(row)
        base = rows[0]["ppl"]
        print(json.dumps({**row, "vs_first": f"{100 * (perplexity / base - 1):+.1f}%"}), flush=True)
        del model
    base = rows[0]
    scored = (f"{args.select} held-out calibration windows x {args.calib_seq_len}" if args.select
              else f"{args.windows} windows x {args.seq_len}")
    print(f"\nmodel {args.model}; ppl on {scored}; torch threads "
          f"{torch.get_num_threads()}")
    print(f"| recipe | weights | ppl | vs {base['name']} | calibration tokens | prune + quantize s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['label']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | "
              f"{r['calib_tokens']} | {r['prune_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
