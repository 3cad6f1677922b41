"""The fidelity grid's markdown tables (benchmarks/fidelity_grid.py): each run's predictions against its
measurement, where TTFT went, the engine's steps against the model, the runs request by request, and how far each
run pins down its own figures."""
from __future__ import annotations

import math

import numpy as np

from pernode.jobs.validate.verdict import TARGET_PCT as TARGETS

COLUMNS = (("TTFT p50 ms", "ttft_p50_ms"), ("TPOT p50 ms", "tpot_p50_ms"), ("goodput req/s", "goodput_rps"),
           ("TTFT p99 ms", "ttft_p99_ms"), ("TPOT p99 ms", "tpot_p99_ms"))


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if abs(v) >= 1 else f"{v:.4g}"


def _ratio(v) -> str:
    return "–" if v is None else f"{v:.3f}x"


def row(shape: str, load: int, v: dict, which: str = "same_trace") -> str:
    """One run's figures against its same-trace prediction, or with `which` "anchored" against the prediction at
    the engine speed its speed anchor measured just before the run."""
    same, measured = v.get(f"predicted_{which}") or {}, v.get("measured") or {}
    errors, where = v.get(f"error_pct_{which}") or {}, v.get("interval_position") or {}
    cells = [shape, f"{load}%", f"{v['workload']['rate_rps']:.3g}", str(v["workload"]["num_prompts"])]
    for _, key in COLUMNS:
        err = errors.get(key)
        ok = "" if err is None else (" ✓" if abs(err) <= TARGETS[key] else " ✗")
        cells.append(f"{_fmt(same.get(key))} / {_fmt(measured.get(key))} "
                     f"({'–' if err is None else f'{err:+.1f}%'}{ok}; {where.get(key) or '–'})")
    cpu = v.get("cpu_cores_used") or {}
    load_avg = v.get("load_average_before_after") or []
    cells.append(f"{cpu.get('ours_cores', float('nan')):.2f} / {cpu.get('others_cores', float('nan')):.2f}")
    cells.append("–".join(f"{x:.2f}" for x in load_avg) or "–")
    return "| " + " | ".join(cells) + " |"


def table(results: list[tuple[str, int, dict]], which: str = "same_trace") -> str:
    """The grid's table against the same-trace prediction, or the anchored one (runs without it left out)."""
    label_of = {"same_trace": "same-trace", "anchored": "anchored", "at_run_speed": "at the run's speed",
                "at_run_speed_by_window": "at the run's speed by window"}[which]
    head = (["shape", "load", "req/s", "requests"]
            + [f"{label}: {label_of} / measured (error; range)" for label, _ in COLUMNS]
            + ["cores ours / others", "load avg before–after"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [row(shape, load, v, which) for shape, load, v in results if v.get(f"predicted_{which}")]
    return "\n".join(lines)


PARTS = (("ttft_ms", "TTFT mean"), ("way_in_and_out_ms", "way in and out"), ("queue_ms", "queue"),
         ("first_steps_ms", "admission to first token"))


def ttft_parts_table(results: list[tuple[str, int, dict]]) -> str:
    """Where each run's mean TTFT went (ms), measured / predicted: the server's histograms against the simulator's
    split of the same trace (jobs/validate/ttft_parts.py); runs without the split are left out."""
    lines = ["| run | " + " | ".join(f"{label} ms: measured / predicted" for _, label in PARTS) + " |",
             "|---|" + "---:|" * len(PARTS)]
    for shape, load, v in results:
        parts = v.get("ttft_parts") or {}
        m, p = parts.get("measured"), parts.get("predicted")
        if not m or not p:
            continue
        lines.append(f"| {shape} {load}% | " + " | ".join(f"{m[k]:.1f} / {p[k]:.1f} ({m[k] - p[k]:+.1f})"
                                                          for k, _ in PARTS) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def engine_busy_table(results: list[tuple[str, int, dict]]) -> str:
    """Each run's engine steps, measured by the server's step clock against the simulated replica on the same trace
    (jobs/validate/engine_busy.py): the step-time error before queueing magnifies it; runs without it left out."""
    lines = ["| run | steps: measured / predicted | busy s: measured wall / predicted | ms a step: measured / "
             "predicted | waited ms a step (wall beyond the engine thread's CPU) | measured / predicted busy | "
             "engine CPU / model, step by step: the anchor just before / the run |", "|---|---:|---:|---:|---:|---:|---:|"]
    for shape, load, v in results:
        busy = v.get("engine_busy") or {}
        m, p = busy.get("measured"), busy.get("predicted")
        if not m or not p or not busy.get("wall_over_predicted"):
            continue
        per = (f"{m['wall_per_step_ms']:.1f} / {p['wall_per_step_ms']:.1f}" if m.get("wall_per_step_ms")
               and p.get("wall_per_step_ms") else "–")
        anchor = ((v.get("speed_anchor") or {}).get("engine_speed") or {}).get("cpu_ratio")
        run = (v.get("engine_speed_run") or {}).get("cpu_ratio")
        lines.append(f"| {shape} {load}% | {m['steps']} / {p.get('steps') or '–'} | {m['wall_s']:.1f} / "
                     f"{p['busy_s']:.1f} | {per} | {m['waited_per_step_ms'] or 0:.2f} | "
                     f"{busy['wall_over_predicted']:.3f}x | {_ratio(anchor)} / {_ratio(run)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


AGREEMENT = (("same_trace", "same trace"), ("at_run_speed", "at the run's speed"),
             ("at_run_speed_by_window", "at the run's speed by window"))


def request_table(results: list[tuple[str, int, dict]]) -> str:
    """Request by request (jobs/validate/request_agreement.py): per run and prediction, the median of measured minus
    simulated and the median |error| for TTFT, TPOT and end-to-end latency; runs without it left out."""
    metrics = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
    lines = ["| run | prediction | " + " | ".join(f"{label}: median ms (median abs %)" for _, label in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for shape, load, v in results:
        for key, label in AGREEMENT:
            agreement = v.get(f"request_agreement_{key}")
            if not agreement:
                continue
            cells = [f"{a['median_ms']:+.1f} ({a['median_abs_pct']:.1f}%)" if (a := agreement.get(m)) else "–"
                     for m, _ in metrics]
            lines.append(f"| {shape} {load}% | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


SPREAD = (("ttft_s", 50, "TTFT p50"), ("tpot_s", 50, "TPOT p50"), ("ttft_s", 99, "TTFT p99"), ("tpot_s", 99, "TPOT p99"))


def measurement_spread_table(results: list[tuple[str, int, dict]], resamples: int = 1000, seed: int = 0) -> str:
    """How well each run pins down its own figures: the run's requests resampled with replacement (`resamples`
    times), and the 5th-95th percentile range of each figure as a percent of the measured one. A prediction cannot
    be shown closer than this; requests of one burst move together, so the true spread is wider still."""
    lines = ["| run | requests | " + " | ".join(f"{label}: 90% range, % of measured" for _, _, label in SPREAD) + " |",
             "|---|---:|" + "---:|" * len(SPREAD)]
    for shape, load, v in results:
        got = v.get("measured_requests")
        if not got:
            continue
        cells = []
        rng = np.random.default_rng(seed)  # per run: a run's range does not depend on the runs listed before it
        for metric, q, _ in SPREAD:
            x = np.asarray([t for t in got[metric] if t is not None], dtype=np.float64)
            if x.size < 2:
                cells.append("–")
                continue
            at = np.percentile(x, q)
            draws = np.percentile(x[rng.integers(0, x.size, (resamples, x.size))], q, axis=1)
            lo, hi = np.percentile(draws, (5, 95))
            cells.append(f"{100 * (lo / at - 1):+.0f}% .. {100 * (hi / at - 1):+.0f}%")
        lines.append(f"| {shape} {load}% | {len(got['ttft_s'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def side_tables(results: list[tuple[str, int, dict]]) -> list[tuple[str, str]]:
    """(title, markdown) of each table beside the error tables that has rows for `results`."""
    tables = (("Where TTFT goes", ttft_parts_table), ("The engine's steps, measured against the model",
                                                      engine_busy_table),
              ("Request by request, measured minus simulated", request_table),
              ("How far each run pins down its own figures (its requests resampled)", measurement_spread_table))
    return [(title, md) for title, make in tables if (md := make(results))]
