"""Sparse KD recovery on the default model: one-shot pruning against the same pruning + KD (masks fixed), on the fixed
perplexity protocol of `pernode eval ppl` (16 windows of 2048 tokens of the pydoc evaluation split; the KD text is
`pernode distill`'s, which never holds that split).

One process does what `pernode prune ... --recover-kd STEPS` does, and then, on the same recovered model, what
`--quantize gptq` adds (prune -> KD -> GPTQ on the recovered survivors), so the prune + int4 variant does not pay a
second pruning and KD. Each stage's perplexity is printed and written to OUT/result.json; each model is saved.

    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src .venv/bin/python benchmarks/pruning_kd_recovery.py \\
        --recipe sparsegpt-50@layerwise=sensitivity,owl_spread=0.1 --steps 60 --lr 2e-4 --then-gptq --out ckpt/sgpt50-kd
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pruning_quality import recipe_of  # noqa: E402

from pernode.quant_format import QuantScheme  # noqa: E402
from pernode.serve.models.loader import load_model  # noqa: E402
from pernode.shrink.checkpoint import save_checkpoint  # noqa: E402
from pernode.shrink.distill.teacher_cache import CACHE_JSON  # noqa: E402
from pernode.shrink.evaluate.perplexity import evaluate_perplexity  # noqa: E402
from pernode.shrink.methods import GPTQ, quantize_model  # noqa: E402
from pernode.shrink.pruning.calibration_text import held_out_windows  # noqa: E402
from pernode.shrink.distill.sparse_recovery import KDRecovery, kd_windows, recover, teacher_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", required=True, help="a pruning recipe of benchmarks/pruning_quality.py (float)")
    ap.add_argument("--steps", type=int, default=KDRecovery.steps)
    ap.add_argument("--lr", type=float, default=KDRecovery.lr)
    ap.add_argument("--batch-size", type=int, default=KDRecovery.batch_size)
    ap.add_argument("--seq-len", type=int, default=KDRecovery.seq_len)
    ap.add_argument("--calib-windows", type=int, default=97)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--skip-one-shot-eval", action="store_true", help="do not score the pruned model before KD")
    ap.add_argument("--then-gptq", action="store_true", help="also GPTQ int4 g64 the recovered model (after KD)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="the teacher cache's folder (default OUT/teacher_cache); runs "
                                                       "with the same KD windows can share one")
    ap.add_argument("--prune-first", action="store_true",
                    help="prune before the teacher cache (on a copy kept as the teacher), then wait for a cache "
                         "another run is writing to --cache-dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_of(args.recipe)
    if recipe.modifier is not None:
        raise SystemExit(f"--recipe {args.recipe}: a float pruning recipe; --then-gptq quantizes after the KD")
    recovery = KDRecovery(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len)
    os.makedirs(args.out, exist_ok=True)
    result = {"recipe": args.recipe, "kd": recovery.to_dict(), "eval": f"{args.eval_windows} x 2048",
              "load_average_start": os.getloadavg(), "started_utc": time.strftime("%H:%M:%S", time.gmtime())}

    def stage(name: str, seconds: float, model=None) -> None:
        result.setdefault("seconds", {})[name] = round(seconds, 1)
        if model is not None:
            ppl = evaluate_perplexity(model, source.tokenizer, max_windows=args.eval_windows).perplexity
            result.setdefault("perplexity", {})[name] = round(ppl, 4)
        result["load_average_" + name] = os.getloadavg()
        print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
        with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    model, source = load_model(args.model)
    calib = held_out_windows(source.tokenizer, 512, args.calib_windows)
    cache_dir = args.cache_dir or os.path.join(args.out, "teacher_cache")
    windows, provenance = kd_windows(source.tokenizer, recovery)
    teacher = copy.deepcopy(model) if args.prune_first else model
    for what in (["prune", "cache"] if args.prune_first else ["cache", "prune"]):
        t = time.perf_counter()
        if what == "cache":
            while args.prune_first and not os.path.isfile(os.path.join(cache_dir, CACHE_JSON)):
                time.sleep(10)
            cache = teacher_cache(teacher, windows, cache_dir, recovery, source.path)
            stage("teacher_cache", time.perf_counter() - t)
        else:
            recipe.apply(model, calib)
            stage("pruned", time.perf_counter() - t, None if args.skip_one_shot_eval else model)
    del teacher
    t = time.perf_counter()
    kd = recover(model, windows, cache, recovery, os.path.join(args.out, "train_state"), args.resume)
    result["history"] = kd["history"]
    stage("pruned+kd", time.perf_counter() - t, model)
    save_checkpoint(model, source, os.path.join(args.out, "sparse"), recipe, details={"kd_recovery": kd})
    if args.then_gptq:
        t = time.perf_counter()
        scheme = QuantScheme(4, 64)
        quantize_model(model, GPTQ(), scheme, calib)
        stage("pruned+kd+gptq-int4-g64", time.perf_counter() - t, model)
        joint = dataclasses.replace(recipe, name=recipe.name + "+gptq-int4-g64", scheme=scheme, modifier=GPTQ())
        save_checkpoint(model, source, os.path.join(args.out, "sparse-int4"), joint, details={"kd_recovery": kd})


if __name__ == "__main__":
    main()
