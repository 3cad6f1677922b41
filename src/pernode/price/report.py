"""Showing a plan: a rich table for the terminal and a PNG of cost and SLO attainment against fleet size."""
from __future__ import annotations

import math
import os

from rich.console import Console
from rich.table import Table

from pernode.progress import output_console
from pernode.price.planner import Comparison, Plan


def _ms(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1000:.0f}"


def _usd(v: float | None) -> str:
    if v is None:
        return "-"
    return f"${v:,.2f}" if v >= 1 else f"${v:.4f}"  # cheap CPU nodes cost fractions of a cent per token


def plan_table(p: Plan) -> Table:
    title = f"pernode plan: {p.profile_label}"
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("workload", p.workload.describe())
    t.add_row("SLO", f"{p.slo.describe()} (ms), attainment >= {p.attainment_target:g}, headroom {p.headroom:g}")
    if not p.feasible:
        t.add_row("result", f"[red]no fleet meets the SLO[/red]: {p.reason}")
    else:
        t.add_row("replicas", f"[green]{p.replicas}[/green] ({p.policy.replace('_', ' ')} load balancing)")
    mb = p.max_batch
    t.add_row("max batch / replica", f"{mb.batch_size} (limited by {mb.limited_by}; KV allows {mb.kv_limit}"
              + (f", TPOT allows {mb.tpot_limit}" if mb.tpot_limit is not None else "")
              + f"; decode step {mb.decode_step_s * 1000:.1f} ms)")
    if p.capacity_rps_per_replica is not None:
        t.add_row("capacity / replica", f"{p.capacity_rps_per_replica:.3g} req/s at full batch "
                  f"(a request holds a slot {p.request_service_s:.3g} s)")
    if p.queueing:
        q = p.queueing
        t.add_row("queueing first guess", f"{q['first_guess_replicas']} replicas, "
                  f"P(wait) {q['probability_of_waiting']:.3f}, TTFT p99 ~ {_ms(q['ttft_p99_estimate_s'])} ms")
    if p.utilisation is not None:
        t.add_row("utilisation", f"{p.utilisation:.1%} of full-batch capacity; simulated slot occupancy "
                  f"{p.slot_occupancy:.1%}, replicas stepping {p.busy_fraction:.1%} of the time")
    iv = p.intervals
    for m in ("ttft", "tpot", "e2e"):
        if m in p.latency_s:
            d = p.latency_s[m]
            row = f"{_ms(d['p50'])} / {_ms(d['p90'])} / {_ms(d['p99'])} ms"
            if len(iv.get("seeds") or ()) > 1:
                row += "  (over seeds: " + ", ".join(_range_ms(iv.get(f"{m}_{q}_ms")) for q in ("p50", "p90", "p99"))
                row += ")"
            t.add_row(f"{m.upper()} p50/p90/p99", row)
    if p.attainment is not None:
        t.add_row("SLO attainment", f"{p.attainment:.2%} of {p.simulated_requests} simulated requests (seed {p.seed})")
        goodput = f"{p.goodput_rps:.3g} req/s, {p.goodput_output_tokens_per_s:,.0f} output tok/s"
        if len(iv.get("seeds") or ()) > 1 and iv.get("goodput_rps"):
            lo, hi = iv["goodput_rps"]
            goodput += f" ({lo:.3g}..{hi:.3g} req/s over seeds {iv['seeds'][0]}..{iv['seeds'][-1]})"
        t.add_row("goodput", goodput)
    if p.price is not None:
        t.add_row("price / node-hour", f"{_usd(p.price.per_node_hour_usd)} ({p.price.source})")
    if p.feasible:
        t.add_row("cost", f"{_usd(p.cost_per_hour_usd)}/h, {_usd(p.cost_per_month_usd)}/month (730 h), "
                  f"{_usd(p.cost_per_million_output_tokens_usd)} per million output tokens")
    for note in p.notes:
        t.add_row("note", note)
    for line in p.rests_on:
        t.add_row("rests on", line)
    for line in p.assumptions:
        t.add_row("[yellow]assumes[/yellow]", line)
    return t


def _range_ms(v: list | None) -> str:
    return "-" if not v else f"{v[0]:.0f}..{v[1]:.0f}"


def comparison_table(c: Comparison) -> Table:
    t = Table(title="pernode plan: cheapest fleet per profile", title_justify="left")
    for col in ("profile", "kind", "replicas", "batch", "attain.", "TTFT p99 ms", "TPOT p99 ms", "$/h",
                "$/month", "$/M out tok"):
        t.add_column(col, justify="left" if col in ("profile", "kind") else "right")
    for label, p in c.ranked():
        if p.feasible:
            t.add_row(label, p.profile_kind, str(p.replicas), str(p.max_batch.batch_size), f"{p.attainment:.3f}",
                      _ms(p.latency_s["ttft"]["p99"]), _ms(p.latency_s["tpot"]["p99"]), _usd(p.cost_per_hour_usd),
                      _usd(p.cost_per_month_usd), _usd(p.cost_per_million_output_tokens_usd))
        else:
            t.add_row(label, p.profile_kind, "[red]none[/red]", str(p.max_batch.batch_size), "-", "-", "-", "-",
                      "-", "-")
    return t


def render_plan(p: Plan, console: Console | None = None) -> None:
    (console or output_console()).print(plan_table(p))


def render_comparison(c: Comparison, console: Console | None = None) -> None:
    con = console or output_console()
    con.print(comparison_table(c))
    for label, p in c.ranked():
        if not p.feasible:
            con.print(f"[red]{label}[/red]: {p.reason}")


def plot_plan(p: Plan, path: str | os.PathLike) -> None:
    """Cost per hour (bars) and simulated SLO attainment (line) against replicas; the chosen size marked."""
    import matplotlib  # lazy: matplotlib takes about a second to import and only --plot needs it

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    if not p.curve:
        raise ValueError("plan has no simulated curve to plot (it stopped before simulating: see plan.reason)")
    ns = [pt.replicas for pt in p.curve]
    fig, ax_cost = plt.subplots(figsize=(7, 4), dpi=120)
    colours = ["#2a9d8f" if pt.replicas == p.replicas else "#b7c9d3" for pt in p.curve]
    ax_cost.bar(ns, [pt.cost_per_hour_usd for pt in p.curve], color=colours, width=0.6, label="cost $/h")
    ax_cost.set_xlabel("replicas")
    ax_cost.set_ylabel("fleet cost ($/hour)")
    ax_att = ax_cost.twinx()
    ax_att.plot(ns, [pt.attainment for pt in p.curve], "o-", color="#e76f51", label="SLO attainment")
    ax_att.axhline(p.attainment_target, color="#e76f51", linestyle="--", linewidth=1,
                   label=f"target {p.attainment_target:g}")
    ax_att.set_ylabel("SLO attainment")
    ax_att.set_ylim(0, 1.02)
    title = p.profile_label
    if p.feasible:
        title += f"\n{p.replicas} replicas, ${p.cost_per_hour_usd:,.2f}/h"
    ax_cost.set_title(title, fontsize=9)
    handles = ax_cost.get_legend_handles_labels()[0] + ax_att.get_legend_handles_labels()[0]
    ax_att.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
