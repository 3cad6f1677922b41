"""A profile's serving_path section summarized again from its saved rounds (`serving_path.streams[].timings`),
with this tree's summarizer: to see what a change of the model (the per-level curve, the engine ratio planned or
not) does to the same measurements, then `fidelity_grid.py --rescore` the recorded runs with the result.

    PYTHONPATH=src python benchmarks/serving_path_resummarize.py p_chat.json p_chat_ratio.json --plan-engine-ratio
"""
from __future__ import annotations

import argparse
import json

from pernode.measure.profile.serving_path_fit import StreamTiming, summarize_streams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("out")
    ap.add_argument("--plan-engine-ratio", action="store_true",
                    help="scale the engine's step times by the measured ratio when its interval excludes 1")
    args = ap.parse_args(argv)
    with open(args.profile) as f:
        profile = json.load(f)
    sp = profile.get("serving_path") or {}
    if not sp.get("streams") or "timings" not in sp["streams"][0]:
        raise SystemExit(f"{args.profile}: its serving_path has no saved rounds (measured without "
                         f"--serving-path-streams)")
    fields = set(StreamTiming.__dataclass_fields__)
    by_level = {lv["streams"]: [(StreamTiming(**{k: v for k, v in d.items() if k in fields}),
                                 StreamTiming(**{k: v for k, v in h.items() if k in fields}))
                                for d, h in lv["timings"]] for lv in sp["streams"]}
    warm = profile.get("prefill") if sp.get("idle_start") else None
    profile["serving_path"] = summarize_streams(by_level, sp["path"], int(sp["input_len"]), int(sp["output_len"]),
                                                tuple(sp["load_avg_1m"]), sp.get("layout") or {}, warm,
                                                args.plan_engine_ratio)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    new = profile["serving_path"]
    print(f"{args.out}: request {new['request_s'] * 1e3:.1f} ms; per step "
          + ", ".join(f"{r['added_s'] * 1e3:.2f}" for r in new["per_step_curve"]) + " ms at "
          + ", ".join(str(r["streams"]) for r in new["per_step_curve"]) + f" streams; engine ratio {new['engine_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
