"""The fleet-fidelity validation grid in one command: does a plan predict what a real fleet does?

For each workload shape (short chat, long-prompt RAG):
  1. profile the node pinned to core 0 with one torch thread (the core and thread count the replica serves with),
     with --serving-path (paired HTTP vs direct-engine timings);
  2. a capacity plan for one replica (`pernode plan --replicas 1`) gives its capacity in req/s;
  3. at 30%, 60% and 90% of that capacity: a plan, then `pernode fleet validate` with one Ray Serve replica pinned
     to core 0 (`--cpuset 0`) and the load generator plus Ray's other processes on core 1 (`--client-cpuset 1`).
Then it prints one markdown table: the same-trace prediction against the measurement for TTFT/TPOT p50 and p99 and
goodput, the error, where the measurement falls in the predicted range over seeds (inside/above/below), whether
it meets the issue's targets (p50s and goodput within 10%, p99s within 20%), the load average and
`cpu_cores_used` (this command and its fleet vs every other process: the noise).

    python benchmarks/fidelity_grid.py --out-dir grid            # the full grid: about 80 minutes on a quiet box
    nice -n 19 python benchmarks/fidelity_grid.py --quick --out-dir grid-quick   # a smoke check of the pipeline

`--path ray|serve` validates through Ray or straight to `pernode serve` and measures that path in the profile at
1, 2, 4, 8, 16 and 32 concurrent streams (the chat plans run up to ~20 at 90%); `--rescore DIR` predicts recorded runs again with other profiles and runs nothing.

Needs two cores (0 and 1) and Ray (`pernode[fleet]`). Every command it runs is printed first and saved in
OUT_DIR/commands.sh, so any step can be rerun by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from pernode.measure.profile.serving_path_servers import wait_ready
from pernode.serve.deploy import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the tables are fidelity_tables.py's; the grid's tests reach them through this module too
from fidelity_tables import (COLUMNS, TARGETS, measurement_spread_table, request_table,  # noqa: E402,F401
                             side_tables, table, ttft_parts_table)


@dataclass(frozen=True)
class Shape:
    name: str
    input_len: str
    output_len: str
    slo: str
    batch_sizes: str
    prompt_lens: str
    context_len: int  # the workload's mean decode context: mean prompt + half the mean output
    max_num_seqs: int


FULL_SHAPES = (
    # SLOs a chat or RAG product on this node could promise: tight enough that goodput is a test, not a count.
    # every batch size up to 32 (the step time jumps between powers of two), then coarser
    Shape("chat", "32:128", "16:32", "ttft_ms=3000,tpot_ms=300", ",".join(map(str, range(1, 33))) + ",48,64",
          "16,32,64,128,256", 92, 64),
    Shape("rag", "256:768", "16:48", "ttft_ms=6000,tpot_ms=400", ",".join(map(str, range(1, 33))),
          "128,256,512,768", 528, 32),
)
QUICK_SHAPES = (
    Shape("chat", "16:32", "4:8", "ttft_ms=10000,tpot_ms=1000", "1,4", "16,64", 30, 4),
    Shape("rag", "128:192", "2:4", "ttft_ms=60000,tpot_ms=1500", "1,2", "128,256", 163, 2),
)


class Runner:
    """Runs each step as a `python -m pernode.cli` subprocess, printed and appended to commands.sh first."""

    def __init__(self, out_dir: str, dry_run: bool, resume: bool):
        self.out_dir, self.dry_run, self.resume = out_dir, dry_run, resume
        self.log = os.path.join(out_dir, "commands.sh")

    def cli(self, args: list[str], out: str, cores: str | None = None) -> None:
        """Run one step that writes `out`. Exit status 1 counts as done when `out` was written: `pernode plan`
        says so when the asked-for fleet misses the SLO (validate still runs it), `fleet validate` when some
        requests failed (the table shows it)."""
        cmd = ([] if cores is None else ["taskset", "-c", cores]) + [sys.executable, "-m", "pernode.cli", *args]
        line = " ".join(shlex.quote(c) for c in cmd)
        if self.resume and os.path.isfile(out):
            print(f"\n(kept from an earlier run: {out})", flush=True)
            return
        print(f"\n$ {line}", flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")
        if self.dry_run:
            return
        if os.path.exists(out):
            os.remove(out)  # so a step that fails cannot leave an earlier run's file behind as its own
        started = time.monotonic()
        rc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        print(f"[{time.monotonic() - started:.0f} s, exit status {rc}]", flush=True)
        if rc not in (0, 1) or not os.path.isfile(out):
            raise SystemExit(f"fidelity_grid: step failed (exit status {rc}, {out} not written): {line}")


def serving_path_flags(path: str | None, shape: Shape, quick: bool) -> list[str]:
    """The profile's serving-path measurement: None the one-at-a-time pairs against `pernode serve` (the grid's
    first runs); `ray` or `serve` the path the grid validates through, at several concurrent streams."""
    if path is None:
        return ["--serving-path", "--serving-path-requests", "4" if quick else "16"]
    lo, hi = (int(x) for x in shape.input_len.split(":"))
    # up to the streams a short-prompt plan runs; long prompts at 32 streams would take a quarter of an hour
    streams = "1,2" if quick else ("1,2,4,8,16,32" if hi <= 256 else "1,2,4,8")
    return ["--serving-path", path, "--serving-path-streams", streams,
            "--serving-path-rounds", "1" if quick else "5", "--serving-path-prompt-len", str((lo + hi) // 2),
            "--serving-path-output-len", "8" if quick else "32"]


def profile_shape(run: Runner, shape: Shape, model_flags: list[str], quick: bool, path: str | None = None,
                  profile_from: str | None = None) -> str:
    """Profile the shape on core 0; with `profile_from`, keep that profile's sweep and measure only the path."""
    out = os.path.join(run.out_dir, f"p_{shape.name}.json")
    base = ["--serving-path-into", profile_from] if profile_from else [
        "--batch-sizes", shape.batch_sizes, "--prompt-lens", shape.prompt_lens, "--context-len", str(shape.context_len)]
    run.cli(["profile", *model_flags, "--num-threads", "1", "--max-num-seqs", str(shape.max_num_seqs), *base,
             *serving_path_flags(path, shape, quick), "--out", out], out, cores="0")
    return out


def plan_shape(run: Runner, shape: Shape, profile: str, rate: float, out: str, quick: bool) -> str:
    run.cli(["plan", "--profile", profile, "--rate", f"{rate:.6g}", "--input-len", shape.input_len,
             "--output-len", shape.output_len, "--slo", shape.slo, "--token-budget", "512", "--replicas", "1",
             "--num-requests", "200" if quick else "1000", "--interval-seeds", "2" if quick else "5",
             "--instance", "aws-c7i.large", "--out", out], out)
    return out


def validate(run: Runner, plan: str, profile: str, model_flags: list[str], num_prompts: int, out: str,
             quick: bool, path: str | None = None) -> str:
    """Through Ray (one replica on core 0, Ray's other processes and the client on core 1), or with path `serve`
    against a `pernode serve` on core 0 with the plan's max batch and the client on core 1."""
    seeds = ["--interval-seeds", "2" if quick else "5"]
    if path != "serve":
        run.cli(["fleet", "validate", "--plan", plan, "--profile", profile, *model_flags,
                 "--cpuset", "0", "--client-cpuset", "1", "--num-prompts", str(num_prompts), *seeds, "--out", out],
                out)
        return out
    if run.resume and os.path.isfile(out):
        return out
    with open(plan) as f:
        batch = json.load(f)["max_batch_per_replica"]["batch_size"]
    port = free_port()
    server = (["taskset", "-c", "0", sys.executable, "-m", "pernode.cli", "serve", *model_flags, "--num-threads", "1",
               "--max-num-seqs", str(max(1, batch)), "--max-queued-requests", str(max(256, num_prompts)),
               "--host", "127.0.0.1", "--port", str(port)])
    print(f"\n$ {' '.join(shlex.quote(c) for c in server)} &", flush=True)
    with open(run.log, "a") as f:
        f.write(" ".join(shlex.quote(c) for c in server) + " &\n")
    if run.dry_run:
        run.cli(["fleet", "validate", "--plan", plan, "--profile", profile, *model_flags, "--base-url",
                 f"http://127.0.0.1:{port}", "--num-prompts", str(num_prompts), *seeds, "--out", out], out, cores="1")
        return out
    with open(os.path.join(run.out_dir, f"serve_{os.path.basename(out)}.log"), "w") as log:
        proc = subprocess.Popen(server, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        run.cli(["fleet", "validate", "--plan", plan, "--profile", profile, *model_flags, "--base-url",
                 f"http://127.0.0.1:{port}", "--num-prompts", str(num_prompts), *seeds, "--out", out], out, cores="1")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def rescore_recorded(folder: str, profiles: list[str], mixed_steps: bool = False) -> int:
    """Every recorded validation in `folder` (v_SHAPE_LOAD.json through Ray, d_SHAPE_LOAD.json straight to
    `pernode serve`) predicted again from the profile given for its shape and path; the errors before (the
    run's `additive_` rescoring when there is one, else its own) and after, in one markdown table."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from pernode.jobs.validate.rescore import rescore

    chosen = {}
    for item in profiles:
        key, sep, path = item.partition("=")
        if not sep or key.count(":") != 1 or key.split(":")[1] not in ("ray", "serve"):
            raise SystemExit(f"--rescore-profile {item!r}: allowed SHAPE:PATH=FILE with PATH ray or serve")
        chosen[key] = path
    keys = [k for _, k in COLUMNS]
    rescored = []
    lines = ["| run | path | model | " + " | ".join(label for label, _ in COLUMNS) + " |", "|---|---|---|" + "---:|" * 5]
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(("v_", "d_")) and name.endswith(".json")):
            continue
        shape, load = name[2:-5].rsplit("_", 1)
        path = "serve" if name.startswith("d_") else "ray"
        profile = chosen.get(f"{shape}:{path}")
        if profile is None:
            continue
        before_file = os.path.join(folder, "additive_" + name)
        with open(before_file if os.path.isfile(before_file) else os.path.join(folder, name)) as f:
            before = json.load(f).get("error_pct_same_trace") or {}
        report = rescore(os.path.join(folder, name), profile, mixed_steps=mixed_steps)
        rescored.append((f"{shape} {path}", int(load), report))
        after, anchored = report.get("error_pct_same_trace") or {}, report.get("error_pct_anchored")
        at_run, by_window = report.get("error_pct_at_run_speed"), report.get("error_pct_at_run_speed_by_window")
        rows = ([("before", before), ("after", after)] + ([("after, anchored", anchored)] if anchored else [])
                + ([("after, at the run's speed", at_run)] if at_run else [])
                + ([("after, at the run's speed by window", by_window)] if by_window else []))
        for label, errs in rows:
            cells = [f"{errs[k]:+.1f}%{' ✓' if abs(errs[k]) <= TARGETS[k] else ''}" if k in errs else "–"
                     for k in keys]
            lines.append(f"| {shape} {load}% | {path} | {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    for title, md in side_tables(rescored):
        print(f"\n{title} (after):\n\n{md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv-cache-bytes", default="256MiB")
    ap.add_argument("--out-dir", default="fidelity-grid")
    ap.add_argument("--shapes", default="chat,rag", help="comma-separated, from chat, rag")
    ap.add_argument("--loads", default="30,60,90", help="percent of one replica's planned capacity")
    ap.add_argument("--duration-s", type=float, default=300.0,
                    help="arrivals per validation run, seconds (default 300; --quick: 8 requests)")
    ap.add_argument("--min-requests", type=int, default=40, help="fewest requests per validation run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check that every step runs")
    ap.add_argument("--path", choices=("ray", "serve"), default=None,
                    help="the serving path to validate through and to measure in the profile at 1 to 32 "
                         "concurrent streams: `ray` (one Ray Serve replica on core 0) or `serve` (`pernode serve` on "
                         "core 0); default: through Ray, with the profile's path measured against `pernode serve` "
                         "one request at a time (the grid's first runs)")
    ap.add_argument("--profile-from", default=None, metavar="DIR",
                    help="keep the decode/prefill sweep of DIR/p_SHAPE.json and measure only the serving path "
                         "(minutes instead of a full profile)")
    ap.add_argument("--rescore", default=None, metavar="DIR",
                    help="run nothing on a fleet: predict every recorded validation in DIR again (`pernode fleet "
                         "rescore`) with the profiles of --rescore-profile and print errors before / after")
    ap.add_argument("--rescore-profile", action="append", default=[], metavar="SHAPE:PATH=FILE",
                    help="the profile for recorded runs of SHAPE (chat, rag) through PATH (ray: v_*.json, serve: "
                         "d_*.json), e.g. chat:ray=p_chat_ray.json; repeatable")
    ap.add_argument("--rescore-mixed-steps", action="store_true",
                    help="with --rescore: predict mixed steps from the profiles' measured mixed[] points "
                         "(`pernode fleet rescore --mixed-steps`) instead of the additive sum")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--resume", action="store_true",
                    help="keep every step whose output file OUT_DIR already holds (after an interruption)")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore_recorded(args.rescore, args.rescore_profile, args.rescore_mixed_steps)
    if len(os.sched_getaffinity(0) & {0, 1}) < 2:
        raise SystemExit("fidelity_grid: needs cores 0 and 1 (the replica on 0, the client and Ray on 1)")
    shapes = {s.name: s for s in (QUICK_SHAPES if args.quick else FULL_SHAPES)}
    chosen = [shapes[n] for n in args.shapes.split(",")]
    loads = [int(x) for x in args.loads.split(",")]
    if any(not 0 < x < 100 for x in loads):
        raise SystemExit(f"--loads {args.loads}: each must be a percentage in (0, 100)")
    os.makedirs(args.out_dir, exist_ok=True)
    run = Runner(args.out_dir, args.dry_run, args.resume)
    model_flags = ["--model", args.model, "--device", "cpu", "--kv-cache-bytes", args.kv_cache_bytes]
    started, results = time.monotonic(), []
    print(f"fidelity grid: shapes {[s.name for s in chosen]}, loads {loads}%, load average {os.getloadavg()}",
          flush=True)
    for shape in chosen:
        profile_from = os.path.join(args.profile_from, f"p_{shape.name}.json") if args.profile_from else None
        profile = profile_shape(run, shape, model_flags, args.quick, args.path, profile_from)
        cap = plan_shape(run, shape, profile, 0.01, os.path.join(args.out_dir, f"cap_{shape.name}.json"), args.quick)
        if args.dry_run:
            continue
        with open(cap) as f:
            capacity = json.load(f)["capacity_rps_per_replica"]
        print(f"{shape.name}: one replica's capacity {capacity:.4g} req/s", flush=True)
        for load in loads:
            rate = load / 100 * capacity
            tag = f"{shape.name}_{load}"
            plan = plan_shape(run, shape, profile, rate, os.path.join(args.out_dir, f"plan_{tag}.json"), args.quick)
            n = 8 if args.quick else max(args.min_requests, math.ceil(rate * args.duration_s))
            prefix = "d" if args.path == "serve" else "v"
            out = validate(run, plan, profile, model_flags, n, os.path.join(args.out_dir, f"{prefix}_{tag}.json"),
                           args.quick, args.path)
            with open(out) as f:
                results.append((shape.name, load, json.load(f)))
            with open(os.path.join(args.out_dir, "grid.md"), "w") as f:  # after every run: a partial grid survives
                f.write(table(results) + "\n")
    if args.dry_run:
        return 0
    md = table(results)
    print(f"\nfidelity grid ({time.monotonic() - started:.0f} s; targets: p50s and goodput within 10%, p99s within "
          f"20%; ✓/✗ against them; range = where the measurement falls in the predicted range over seeds)\n")
    if any(v.get("predicted_anchored") for _, _, v in results):
        md += ("\n\nAgainst the prediction at the engine speed each run's speed anchor measured just before it:\n\n"
               + table(results, "anchored"))
    if any(v.get("predicted_at_run_speed") for _, _, v in results):
        md += ("\n\nAfter the fact, at the engine speed each run measured step by step (the node's drift taken out of "
               "the error):\n\n" + table(results, "at_run_speed"))
    if any(v.get("predicted_at_run_speed_by_window") for _, _, v in results):
        md += ("\n\nAfter the fact, at the engine speed each run measured in each 10 s of it:\n\n"
               + table(results, "at_run_speed_by_window"))
    for title, table_md in side_tables(results):
        md += f"\n\n{title}:\n\n{table_md}"
    print(md)
    with open(os.path.join(args.out_dir, "grid.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out_dir, "grid.json"), "w") as f:
        json.dump([{"shape": s, "load_pct": load, "validation": v} for s, load, v in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
