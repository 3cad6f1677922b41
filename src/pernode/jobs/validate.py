"""`pernode fleet validate`: run a plan's workload against a real fleet and set the measurements beside the plan.

Brings up the plan's replicas on Ray Serve with `--max-num-seqs` = the plan's max batch per replica (or uses a
running fleet, `--base-url`), sends the plan's workload with `bench serve` (same rate, burstiness and lengths,
`ignore_eos` so outputs run to their lengths), and prints predicted vs measured goodput, SLO attainment, TTFT
p50/p99 and TPOT p50/p99, each error as (measured - predicted) / predicted in percent: positive means slower (or
more goodput) than predicted.

Two predictions: the plan's own (its simulated trace of `simulated_requests`), and, with `--profile`, the same
simulator replaying the exact requests sent (the bench's arrival times and lengths), which takes sampling noise out
of the comparison and leaves the model's error.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time

import numpy as np

from pernode.config import EngineConfig
from pernode.measure.bench.arrivals import arrival_offsets_s
from pernode.measure.bench.bench_serve import build_requests, run_bench
from pernode.measure.bench.config import BenchConfig
from pernode.serve.deploy.ray_fleet import ROUTER_POLICY, FleetSpec, LocalFleet, free_port, load_plan
from pernode.serve.server.options import ServerSettings

# (row label, bench key, plan key) with latencies in ms
METRICS = (("goodput (req/s)", "request_goodput_per_s", "goodput_rps"),
           ("SLO attainment", "attainment", "attainment"),
           ("TTFT p50 (ms)", "median_ttft_ms", ("ttft", "p50")),
           ("TTFT p99 (ms)", "p99_ttft_ms", ("ttft", "p99")),
           ("TPOT p50 (ms)", "median_tpot_ms", ("tpot", "p50")),
           ("TPOT p99 (ms)", "p99_tpot_ms", ("tpot", "p99")),
           ("E2E p50 (ms)", "median_e2el_ms", ("e2e", "p50")),
           ("E2E p99 (ms)", "p99_e2el_ms", ("e2e", "p99")))
DEFAULT_DURATION_S = 120.0  # enough arrivals for a p99 at the rates a 2-core box takes
IDLE_PROBE_REQUESTS = 8  # one at a time before the run: the serving path's own latency, without queueing


_LEN = r"(\d+|uniform \d+\.\.\d+)"
_DESC = re.compile(rf"\((Poisson|gamma burstiness ([0-9.eE+-]+))\), input {_LEN}, output {_LEN}")


def workload_from_plan(plan: dict, input_len: str | None = None, output_len: str | None = None,
                       burstiness: float | None = None) -> dict:
    """{rate_rps, input_len 'LO:HI', output_len 'LO:HI', burstiness} from the plan's workload description, where
    the flags given win. A trace-based plan has no ranges to read: pass --input-len and --output-len."""
    desc = plan["workload"]["description"]
    m = _DESC.search(desc)
    if m is None and (input_len is None or output_len is None or burstiness is None):
        raise ValueError(f"the plan's workload {desc!r} has no fixed or uniform lengths to replay; pass "
                         f"--input-len, --output-len and --burstiness")

    def rng(text: str) -> str:
        return text.replace("uniform ", "").replace("..", ":")

    return {"rate_rps": float(plan["workload"]["rate_rps"]),
            "input_len": input_len or rng(m.group(3)),
            "output_len": output_len or rng(m.group(4)),
            "burstiness": burstiness if burstiness is not None else (1.0 if m.group(1) == "Poisson"
                                                                      else float(m.group(2)))}


def bench_config(base_url: str, workload: dict, num_prompts: int, seed: int, slo_ms: dict, tokenizer: str | None,
                 num_warmup: int, model: str | None = None) -> BenchConfig:
    slo = ",".join(f"{k}={v:g}" for k, v in slo_ms.items() if v is not None)
    return BenchConfig(base_url=base_url, dataset="random", random_input_len=workload["input_len"],
                       random_output_len=workload["output_len"], request_rate=workload["rate_rps"],
                       burstiness=workload["burstiness"], num_prompts=num_prompts, seed=seed, ignore_eos=True,
                       num_warmup=num_warmup, percentiles="50,90,99", slo=slo or None, tokenizer=tokenizer,
                       model=model)


def tokenizer_path(model: str) -> str | None:
    """A tokenizer bench serve can load for exact prompt lengths: the folder's tokenizer.json or the .gguf."""
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "tokenizer.json")):
        return model
    if model.endswith(".gguf") and os.path.isfile(model):
        return model
    from pernode.serve.models.registry import KNOWN_MODELS

    path = KNOWN_MODELS[model].path() if model in KNOWN_MODELS else None
    return path if path and str(path).endswith(".gguf") else None


def predicted_from_plan(plan: dict) -> dict:
    out = {}
    for _, _, key in METRICS:
        if isinstance(key, tuple):
            v = ((plan.get("latency_s") or {}).get(key[0]) or {}).get(key[1])
            out[f"{key[0]}_{key[1]}_ms"] = None if v is None else v * 1000.0
        else:
            out[key] = plan.get(key)
    return out


def predicted_same_trace(profile: dict, plan: dict, requests, offsets_s, token_budget: int,
                         prompt_tokens=None) -> dict:
    """The planner's simulator on exactly the requests `bench serve` sends: same arrivals, prompts, outputs.
    `prompt_tokens`, when given, are the prompt lengths the server counted (its usage), else the bench's."""
    from pernode.price.simulator import ReplicaConfig, simulate_fleet
    from pernode.slo import SLO
    from pernode.price.step_time import StepTimeModel, kv_max_tokens
    from pernode.price.workload import RequestTrace

    prompt = np.array(prompt_tokens if prompt_tokens is not None else [r.prompt_len for r in requests],
                      dtype=np.int64)
    output = np.array([r.max_tokens for r in requests], dtype=np.int64)
    mean_decode_context = float(prompt.mean() + output.mean() / 2.0)
    step_model = StepTimeModel.from_profile(profile, context_tokens=mean_decode_context)
    batch = int(plan["max_batch_per_replica"]["batch_size"])
    replica = ReplicaConfig(step_model, batch, kv_max_tokens(profile), token_budget)
    trace = RequestTrace(np.asarray(offsets_s, dtype=np.float64), prompt, output)
    res = simulate_fleet(trace, replica, int(plan["replicas"]), ROUTER_POLICY)
    slo_ms = plan.get("slo_ms") or {}
    slo = SLO(**{f"{k[:-3]}_s": v / 1000.0 for k, v in slo_ms.items() if v is not None})
    out = {"goodput_rps": res.goodput_rps(slo), "attainment": res.attainment(slo)}
    for metric in ("ttft", "tpot", "e2e"):
        for q, v in res.percentiles_s(metric).items():
            out[f"{metric}_{q}_ms"] = v * 1000.0
    return out


def idle_probe_report(result: dict, profile: dict | None) -> dict:
    """What the serving path adds with no queueing: each probe request's TTFT against the profile's prefill time
    for its own prompt length (the server's usage count), and its TPOT against one decode step at batch 1."""
    rows = [r for r in result["per_request"] if r["success"]]
    out: dict = {"requests": len(rows), "max_concurrency": 1,
                 "measured": {"ttft_p50_ms": _median_ms(r["ttft_s"] for r in rows),
                              "tpot_p50_ms": _median_ms(r["tpot_s"] for r in rows)}}
    if profile is not None and rows:
        from pernode.price.step_time import StepTimeModel

        mean_context = float(np.mean([r["prompt_tokens"] + r["output_tokens"] / 2.0 for r in rows]))
        step_model = StepTimeModel.from_profile(profile, context_tokens=mean_context)
        out["added_ms"] = {
            "ttft_p50": _median_ms(r["ttft_s"] - step_model.prefill_s(r["prompt_tokens"]) for r in rows),
            "tpot_p50": _median_ms(r["tpot_s"] - step_model.decode_step_s(1) for r in rows
                                   if r["tpot_s"] is not None)}
    return out


def _median_ms(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) * 1000.0 if v else None


def measured_from_bench(result: dict) -> dict:
    out = {}
    for _, bench_key, key in METRICS:
        name = f"{key[0]}_{key[1]}_ms" if isinstance(key, tuple) else key
        if bench_key == "attainment":
            good = result.get("good_requests")
            out[name] = None if good is None else good / result["num_prompts"]
        else:
            out[name] = result.get(bench_key)
    return out


def errors_pct(predicted: dict, measured: dict) -> dict:
    out = {}
    for k, p in predicted.items():
        m = measured.get(k)
        ok = isinstance(p, (int, float)) and isinstance(m, (int, float)) and math.isfinite(p) and p != 0
        out[k] = (m - p) / abs(p) * 100.0 if ok else None
    return out


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def tree_cpu_s(pids) -> float:
    """CPU-seconds used so far by `pids` (this process counts its waited-for children too)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) * _TICK_S
    return total


class CpuShare:
    """How much of the machine processes other than ours used during a run: the noise a shared box adds."""

    def __init__(self):
        from pernode.serve.deploy.ray_fleet import child_processes

        self._ours = lambda: {os.getpid(), *child_processes()}
        self.start_busy, self.start_ours, self.start_t = busy_cpu_s(), tree_cpu_s(self._ours()), time.monotonic()

    def stop(self) -> dict:
        busy, ours, wall = busy_cpu_s(), tree_cpu_s(self._ours()), time.monotonic() - self.start_t
        others = max(0.0, (busy - self.start_busy) - (ours - self.start_ours))
        return {"wall_s": wall, "ours_cores": (ours - self.start_ours) / wall, "others_cores": others / wall,
                "machine_cores": os.cpu_count()}


def run_validate(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    import dataclasses


    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    plan = load_plan(args.plan)
    profile = None
    if args.profile:
        with open(args.profile, encoding="utf-8") as f:
            profile = json.load(f)
    workload = workload_from_plan(plan, args.input_len, args.output_len, args.burstiness)
    replicas = int(plan["replicas"])
    batch = int(plan["max_batch_per_replica"]["batch_size"])
    num_prompts = args.num_prompts or max(300, math.ceil(workload["rate_rps"] * DEFAULT_DURATION_S))
    engine = dataclasses.replace(engine_config, max_num_seqs=batch)
    notes = []
    if plan.get("policy") != ROUTER_POLICY:
        notes.append(f"the plan assumed --policy {plan.get('policy')}; Ray Serve's router is modelled by "
                     f"{ROUTER_POLICY}")
    if profile is not None:
        pm, qm = (plan.get("profile") or {}).get("model"), (profile.get("model") or {}).get("name")
        if pm and qm and pm != qm:
            notes.append(f"--profile is of {qm} but the plan is of {pm}")
    tokenizer = tokenizer_path(args.model)  # exact prompt lengths; with --base-url, --model names the model served
    load_before = os.getloadavg()

    def bench(url: str) -> tuple[BenchConfig, dict]:
        # Idle probe first (it also warms every replica's HTTP path), then the plan's workload.
        probe = dataclasses.replace(
            bench_config(url, workload, IDLE_PROBE_REQUESTS, args.seed + 1, plan.get("slo_ms") or {}, tokenizer,
                         num_warmup=2 * replicas), max_concurrency=1, no_progress=True)
        idle.update(args=probe, result=run_bench(probe))
        b = dataclasses.replace(bench_config(url, workload, num_prompts, args.seed, plan.get("slo_ms") or {},
                                             tokenizer, num_warmup=0), out=args.bench_out)
        share = CpuShare()
        result = run_bench(b)
        cpu.update(share.stop())
        return b, result

    cpu: dict = {}

    idle: dict = {}

    fleet_info: dict = {"base_url": args.base_url}
    started = time.monotonic()
    if args.base_url:
        bargs, result = bench(args.base_url)
    else:
        # Room for every request of the run to wait in an engine: a 429 would be a failure, not a latency.
        settings = ServerSettings(max_queued_requests=max(256, num_prompts))
        spec = FleetSpec(engine=engine, settings=settings, replicas=replicas,
                         num_cpus_per_replica=args.num_cpus_per_replica, threads_per_replica=args.threads_per_replica,
                         max_ongoing_requests=args.max_ongoing_requests, port=args.port or free_port())
        with LocalFleet(spec) as fleet:
            fleet_info = dict(fleet.info)
            print(f"pernode fleet validate: {replicas} replicas (max_num_seqs {batch}) up at {fleet.url} in "
                  f"{fleet_info['startup_s']:.1f} s; sending {num_prompts} requests at "
                  f"{workload['rate_rps']:g} req/s", flush=True)
            bargs, result = bench(fleet.url)
    predicted = predicted_from_plan(plan)
    measured = measured_from_bench(result)
    report = {
        "kind": "fleet_validate",
        "plan": os.path.abspath(args.plan),
        "profile": os.path.abspath(args.profile) if args.profile else None,
        "model": args.model,
        "replicas": replicas,
        "max_num_seqs": batch,
        "router": ROUTER_POLICY,
        "fleet": fleet_info,
        "workload": {**workload, "num_prompts": num_prompts, "seed": args.seed, "ignore_eos": True},
        "slo_ms": plan.get("slo_ms"),
        "predicted": predicted,
        "measured": measured,
        "error_pct": errors_pct(predicted, measured),
        "failed_requests": result.get("failed"),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        # cores used during the measured run by this process and the fleet it started, and by everything else
        "cpu_cores_used": cpu,
        "wall_s": time.monotonic() - started,
        "notes": notes + list(result.get("notes") or []),
    }
    if profile is not None:
        budget = args.token_budget or engine.max_num_batched_tokens or 512
        requests = build_requests(bargs)
        offsets = arrival_offsets_s(len(requests), bargs.request_rate, bargs.burstiness, bargs.seed)
        counted = [row["prompt_tokens"] if row["success"] and row["prompt_tokens"] else req.prompt_len
                   for row, req in zip(result["per_request"], requests)]
        same = predicted_same_trace(profile, plan, requests, offsets, budget, counted)
        report["predicted_same_trace"] = same
        report["error_pct_same_trace"] = errors_pct(same, measured)
        report["token_budget"] = budget
    report["idle_probe"] = idle_probe_report(idle["result"], profile)
    print_validation(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(_clean(report), f, indent=2, allow_nan=False)
            f.write("\n")
    return 0 if not result.get("failed") else 1


def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def print_validation(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    same = report.get("predicted_same_trace")
    w = report["workload"]
    t = Table(title=f"fleet validate: {report['replicas']} replicas x max batch {report['max_num_seqs']}, "
                    f"{w['rate_rps']:g} req/s, input {w['input_len']}, output {w['output_len']}, "
                    f"{w['num_prompts']} requests")
    t.add_column("metric")
    t.add_column("predicted (plan)", justify="right")
    if same:
        t.add_column("predicted (same trace)", justify="right")
    t.add_column("measured", justify="right")
    t.add_column("error vs plan", justify="right")
    if same:
        t.add_column("error vs same trace", justify="right")

    def num(v):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:,.3g}"

    def pct(v):
        return "-" if v is None else f"{v:+.1f}%"

    for label, _, key in METRICS:
        k = f"{key[0]}_{key[1]}_ms" if isinstance(key, tuple) else key
        row = [label, num(report["predicted"].get(k))]
        if same:
            row.append(num(same.get(k)))
        row += [num(report["measured"].get(k)), pct(report["error_pct"].get(k))]
        if same:
            row.append(pct(report["error_pct_same_trace"].get(k)))
        t.add_row(*row)
    console.print(t)
    probe = report.get("idle_probe") or {}
    m, added = probe.get("measured") or {}, probe.get("added_ms") or {}
    if m.get("ttft_p50_ms") is not None:
        line = (f"idle probe ({probe['requests']} requests one at a time): TTFT p50 {m['ttft_p50_ms']:.1f} ms, "
                f"TPOT p50 {m['tpot_p50_ms']:.2f} ms")
        if added.get("ttft_p50") is not None:
            line += (f"; against the profile, request by request, the serving path (HTTP, proxy, tokenizing) adds "
                     f"{added['ttft_p50']:+.1f} ms to TTFT and {added['tpot_p50']:+.2f} ms to TPOT (medians) before "
                     f"any queueing")
        console.print(line)
    cpu = report.get("cpu_cores_used") or {}
    if cpu:
        who = "this command and its fleet" if not report["fleet"].get("base_url") else "this command"
        console.print(f"during the run {who} used {cpu['ours_cores']:.2f} cores and other processes "
                      f"{cpu['others_cores']:.2f}, of {cpu['machine_cores']}")
    for note in report.get("notes") or []:
        console.print(f"[yellow]note[/yellow]: {note}")
