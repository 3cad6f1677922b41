"""What moves a recorded grid's predictions: rescore its validations with the profile changed one way at a time.

Nothing is measured; every validation JSON in DIR (v_* through Ray, d_* straight to `pernode serve`) is predicted
again on its own recorded trace (`pernode fleet rescore`), with

  --scale 0.95,1.05        the engine's step times scaled (the profile's serving_path.engine_ratio): how much a
                           few percent of engine speed moves each error, load by load;
  --sweep-from OTHER.json  the decode, prefill and mixed points of another profile of the same node, the serving
                           path kept: how far two profiles' sweeps disagree, in prediction error;
  --mixed-steps            mixed steps from the profile's measured mixed[] points instead of the additive sum;
  --request-cpu-ms 2,5     the serving path's per-request work on the engine's core (serving_path.request_cpu_s),
                           added to the step each request is admitted in;
  --steps                  where the simulated replica spends its busy time: steps by running decodes, pure or
                           with a prompt chunk (which decode batches and which model terms matter at each load);
  --at-run-speed           with --scale: each run predicted at its own measured engine speed times each scale, its
                           figures beside the measured ones (how far a percent of speed moves each figure when the
                           model is otherwise right).

    PYTHONPATH=src python benchmarks/rescore_what_ifs.py grid_ray --shape chat --path ray --scale 0.95,1.05 --steps
    PYTHONPATH=src python benchmarks/rescore_what_ifs.py grid_serve --shape chat --path serve \\
        --sweep-from grid_ray/p_chat.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_grid import rescore_recorded  # noqa: E402 - a sibling script

from pernode.jobs.validate.compare import replica_config, simulated_trace  # noqa: E402
from pernode.jobs.validate.speed_anchor import scaled_profile  # noqa: E402
from pernode.price.intervals import summary_values  # noqa: E402
from pernode.price.fleet_plan import Plan  # noqa: E402
from pernode.price.simulator import simulate_fleet  # noqa: E402
from pernode.price.workload import RequestTrace  # noqa: E402

SWEEP_KEYS = ("decode", "prefill", "mixed")
DECODE_BINS = ((0, 0), (1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**6))


def variant(profile: dict, scale: float | None = None, sweep_from: dict | None = None,
            request_cpu_ms: float | None = None) -> dict:
    """`profile` with its engine step times scaled by `scale`, the sweep points of `sweep_from`, and/or a per-request
    serving cost of `request_cpu_ms` on the engine's core."""
    out = copy.deepcopy(profile)
    if request_cpu_ms is not None:
        section = out.setdefault("serving_path", {"request_s": 0.0, "token_s": 0.0})
        section["request_cpu_s"] = request_cpu_ms / 1000.0
    if sweep_from is not None:
        for key in SWEEP_KEYS:
            if key in sweep_from:
                out[key] = copy.deepcopy(sweep_from[key])
    if scale is not None:
        if not 0.5 <= scale <= 2.0:
            raise SystemExit(f"--scale {scale}: allowed 0.5 to 2")
        section = out.setdefault("serving_path", {"request_s": 0.0, "token_s": 0.0})
        section["engine_ratio"] = float(section.get("engine_ratio", 1.0)) * scale
    return out


def busy_time_shares(report_path: str, profile: dict, mixed_steps: bool, plan_path: str | None = None) -> list[str]:
    """The simulated replica's busy time on the report's trace, by running decodes and pure / mixed steps."""
    with open(report_path) as f:
        report = json.load(f)
    plan = Plan.load(plan_path or report["plan"])
    t = report["same_trace_requests"]
    prompt, out = np.asarray(t["prompt_tokens"]), np.asarray(t["output_tokens"])
    config = replica_config(profile, plan, float(prompt.mean() + out.mean() / 2.0), int(report["token_budget"]),
                            mixed_steps)
    sim = simulate_fleet(RequestTrace(np.asarray(t["offsets_s"], dtype=np.float64), prompt, out), config, 1,
                         record_schedule=True)
    rows = []
    for start, step in sim.schedules[0]:
        decodes = sum(1 for _, n in step if n == 1)
        prompt_tokens = sum(n for _, n in step if n > 1)
        rows.append((decodes, prompt_tokens, config.step_model.step_s(decodes, prompt_tokens)))
    a = np.asarray(rows, dtype=np.float64)
    total = a[:, 2].sum()
    lines = [f"{len(a)} steps, {total:.1f} s busy, at most {int(a[:, 0].max())} decodes in a step"]
    for lo, hi in DECODE_BINS:
        in_bin = (a[:, 0] >= lo) & (a[:, 0] <= hi)
        for kind, mask in (("pure decode", in_bin & (a[:, 1] == 0)), ("with a prompt chunk", in_bin & (a[:, 1] > 0))):
            if mask.any():
                lines.append(f"  {lo}-{hi if hi < 10**6 else '...'} decodes, {kind}: {int(mask.sum())} steps, "
                             f"{a[mask, 2].sum() / total:.0%} of the busy time, {a[mask, 1].mean():.0f} prompt "
                             f"tokens a step")
    return lines


AT_RUN_SPEED_FIGURES = ("ttft_p50_ms", "tpot_p50_ms", "ttft_p99_ms", "tpot_p99_ms")


def at_run_speed_sensitivity(report_path: str, profile: dict, scales: list[float]) -> list[str]:
    """The report's run predicted at its own engine speed (engine_speed_run's decode and prefill ratios, the prompts'
    on the wall where the report has it) times each of `scales`, as markdown rows: the figures, then the measured
    ones."""
    with open(report_path) as f:
        report = json.load(f)
    run, t = report.get("engine_speed_run"), report["same_trace_requests"]
    if not run:
        return []
    plan = Plan.load(report["plan"])
    name = os.path.basename(report_path)
    rows = []
    prefill = run.get("prefill_wall_ratio", run["prefill_ratio"])
    for scale in scales:
        sim = simulated_trace(scaled_profile(profile, run["decode_ratio"] * scale, prefill * scale), plan,
                              t["offsets_s"], t["prompt_tokens"], t["output_tokens"], int(report["token_budget"]))
        got = summary_values(sim, plan.slo)
        rows.append(f"| {name} | x{scale:g} | " + " | ".join(f"{got[k]:.1f}" for k in AT_RUN_SPEED_FIGURES) + " |")
    measured = report["measured"]
    rows.append(f"| {name} | measured | " + " | ".join(f"{measured[k]:.1f}" for k in AT_RUN_SPEED_FIGURES) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a grid folder: p_SHAPE.json, plan_*.json and v_*/d_* validation JSON")
    ap.add_argument("--shape", default="chat")
    ap.add_argument("--path", choices=("ray", "serve"), required=True)
    ap.add_argument("--profile", default=None, help="default: DIR/p_SHAPE.json")
    ap.add_argument("--scale", default="", help="comma-separated engine speed factors, e.g. 0.95,1.05")
    ap.add_argument("--sweep-from", default=None, metavar="PROFILE")
    ap.add_argument("--mixed-steps", action="store_true")
    ap.add_argument("--request-cpu-ms", default="", help="comma-separated per-request serving CPU, ms, e.g. 2,5")
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--at-run-speed", action="store_true")
    args = ap.parse_args(argv)
    profile_path = args.profile or os.path.join(args.dir, f"p_{args.shape}.json")
    with open(profile_path) as f:
        profile = json.load(f)
    sweep = None
    if args.sweep_from:
        with open(args.sweep_from) as f:
            sweep = json.load(f)
    scales = [float(x) for x in args.scale.split(",") if x.strip()] or [None]
    request_cpus = [float(x) for x in args.request_cpu_ms.split(",") if x.strip()] or [None]
    prefix = "v_" if args.path == "ray" else "d_"
    if args.at_run_speed:
        lines = ["| run | speed | " + " | ".join(AT_RUN_SPEED_FIGURES) + " |", "|---|---|" + "---:|" * 4]
        for name in sorted(os.listdir(args.dir)):
            if name.startswith(prefix + args.shape + "_") and name.endswith(".json"):
                lines += at_run_speed_sensitivity(os.path.join(args.dir, name), profile, [1.0, *(x for x in scales
                                                                                             if x and x != 1.0)])
        print("\n".join(lines))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for scale, request_cpu in [(a, b) for a in scales for b in request_cpus]:
            changed = variant(profile, scale, sweep, request_cpu)
            path = os.path.join(tmp, f"p_{scale}_{request_cpu}.json")
            with open(path, "w") as f:
                json.dump(changed, f)
            label = ", ".join(x for x in (f"engine x{scale}" if scale else "",
                                          f"sweep from {args.sweep_from}" if sweep else "",
                                          f"{request_cpu} ms per request" if request_cpu is not None else "",
                                          "mixed steps measured" if args.mixed_steps else "") if x) or "as recorded"
            print(f"\n## {args.dir} ({args.path}), {label}\n")
            rescore_recorded(args.dir, [f"{args.shape}:{args.path}={path}"], args.mixed_steps)
            if args.steps:
                for name in sorted(os.listdir(args.dir)):
                    if name.startswith(prefix + args.shape + "_") and name.endswith(".json"):
                        plan = os.path.join(args.dir, "plan_" + name[2:])
                        print(f"\n{name}: " + "\n".join(busy_time_shares(os.path.join(args.dir, name), changed,
                                                                          args.mixed_steps,
                                                                          plan if os.path.isfile(plan) else None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
