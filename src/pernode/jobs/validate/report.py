"""The validation report on screen (a table of predicted, measured and errors) and as JSON."""
from __future__ import annotations

import json
import math

from rich.console import Console
from rich.table import Table

from pernode.jobs.validate.engine_busy import describe_engine_busy
from pernode.jobs.validate.request_agreement import describe_agreement
from pernode.jobs.validate.speed_anchor import describe_anchor
from pernode.jobs.validate.ttft_parts import describe_ttft_parts
from pernode.jobs.validate.verdict import describe_verdicts
from pernode.progress import output_console
from pernode.jobs.validate.compare import METRICS


def print_validation(report: dict, console: Console | None = None) -> None:
    console = console or output_console()
    same = report.get("predicted_same_trace")
    anchored = report.get("predicted_anchored")
    at_run = report.get("predicted_at_run_speed")
    by_window = report.get("predicted_at_run_speed_by_window")
    w = report["workload"]
    t = Table(title=f"fleet validate: {report['replicas']} replicas x max batch {report['max_num_seqs']}, "
                    f"{w['rate_rps']:g} req/s, input {w['input_len']}, output {w['output_len']}, "
                    f"{w['num_prompts']} requests")
    t.add_column("metric")
    t.add_column("predicted (plan)", justify="right")
    if same:
        t.add_column("predicted (same trace)", justify="right")
    if anchored:
        t.add_column("predicted (anchored)", justify="right")
    t.add_column("measured", justify="right")
    t.add_column("error vs plan", justify="right")
    if same:
        t.add_column("error vs same trace", justify="right")
    if anchored:
        t.add_column("error vs anchored", justify="right")
    if at_run:
        t.add_column("error at the run's engine speed", justify="right")
    if by_window:
        t.add_column("error at its speed window by window", justify="right")
    for m in METRICS:
        row = [m.label, _num(report["predicted"].get(m.key))]
        row += [_num(p.get(m.key)) for p in (same, anchored) if p]
        row += [_num(report["measured"].get(m.key)), _pct(report["error_pct"].get(m.key))]
        if same:
            row.append(_pct(report["error_pct_same_trace"].get(m.key)))
        if anchored:
            row.append(_pct(report["error_pct_anchored"].get(m.key)))
        if at_run:
            row.append(_pct(report["error_pct_at_run_speed"].get(m.key)))
        if by_window:
            row.append(_pct(report["error_pct_at_run_speed_by_window"].get(m.key)))
        t.add_row(*row)
    console.print(t)
    for line in describe_verdicts(report):
        console.print(line)
    interval, where = report.get("predicted_interval") or {}, report.get("interval_position") or {}
    if interval:
        seeds = interval.get("seeds") or []
        console.print(f"predicted range over {len(seeds)} simulated runs of {w['num_prompts']} requests "
                      f"(seeds {seeds[0]}..{seeds[-1]}): where the measurement falls")
        for m in METRICS:
            rng = interval.get(m.key)
            if rng is None:
                continue
            pos = where.get(m.key)
            colour = {"inside": "green", None: "white"}.get(pos, "red")
            console.print(f"  {m.label}: {_num(rng[0])} .. {_num(rng[1])}, measured "
                          f"{_num(report['measured'].get(m.key))} [{colour}]{pos or '-'}[/{colour}]")
    split = (report.get("fleet") or {}).get("machine_split")
    if split:
        reps = ", ".join(f"replica {r['slot']} on cores {r['cores']}" for r in split["replicas"]) or "replicas unpinned"
        console.print(f"machine split ({split['machine_cores']} cores): {reps}; load generator on "
                      f"{split['load_generator_cores']}, Ray's other processes on "
                      f"{', '.join(split['ray_other_processes_cores']) or '-'}"
                      + (f"; the load generator shares cores {split['cores_shared_by_load_generator_and_replicas']} "
                         f"with replicas" if split["cores_shared_by_load_generator_and_replicas"] else ""))
    probe = report.get("idle_probe") or {}
    measured, added = probe.get("measured") or {}, probe.get("added_ms") or {}
    if measured.get("ttft_p50_ms") is not None:
        line = (f"idle probe ({probe['requests']} requests one at a time): TTFT p50 {measured['ttft_p50_ms']:.1f} ms, "
                f"TPOT p50 {measured['tpot_p50_ms']:.2f} ms")
        if added.get("ttft_p50") is not None:
            line += (f"; against the profile, request by request, the serving path (HTTP, proxy, tokenizing) adds "
                     f"{added['ttft_p50']:+.1f} ms to TTFT and {added['tpot_p50']:+.2f} ms to TPOT (medians) before "
                     f"any queueing")
        console.print(line)
    for line in describe_ttft_parts(report.get("ttft_parts") or {}):
        console.print(f"where TTFT goes: {line}")
    for line in describe_engine_busy(report.get("engine_busy") or {}) + describe_anchor(report):
        console.print(line)
    for key, which in (("same_trace", "on the same trace"), ("at_run_speed", "at the run's engine speed"),
                       ("at_run_speed_by_window", "at the run's engine speed window by window")):
        for line in describe_agreement(report.get(f"request_agreement_{key}"), which):
            console.print(line)
    cpu = report.get("cpu_cores_used") or {}
    if cpu:
        who = "this command and its fleet" if not report["fleet"].get("base_url") else "this command"
        console.print(f"during the run {who} used {cpu['ours_cores']:.2f} cores and other processes "
                      f"{cpu['others_cores']:.2f}, of {cpu['machine_cores']}")
    for note in report.get("notes") or []:
        console.print(f"[yellow]note[/yellow]: {note}")


def write_report(report: dict, path: str) -> None:
    """JSON has no NaN or infinity: they are written as null."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(report), f, indent=2, allow_nan=False)
        f.write("\n")


def _num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:,.3g}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def _finite(o):
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
