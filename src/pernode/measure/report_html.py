"""One self-contained HTML report of a profile (and bench serve runs): charts as embedded PNGs, plus tables.

Charts are drawn on matplotlib's Agg canvas directly (no pyplot), so making a report never changes the global
backend or opens windows, and it works on a headless server.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pernode.measure.profile.profile_schema import Profile, peak_flops_for, validate_profile

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em 1em; margin: 1em 0; }
.muted { color: #666; font-size: 0.9em; } img { max-width: 100%; }
"""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def quantization_chart_png(rows: Sequence[dict]) -> str:
    """Quality against speed: perplexity vs batch-1 decode tok/s per quantized checkpoint, as an <img>."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(111)
    for r in rows:
        ax.scatter(r["decode_b1_tok_s"], r["ppl"], s=20 + r["checkpoint_mb"] / 5, alpha=0.7)
        ax.annotate(r["name"], (r["decode_b1_tok_s"], r["ppl"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("batch-1 decode, tokens/s (higher is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quantized and pruned checkpoints: quality vs speed (marker area ~ checkpoint size)")
    ax.grid(alpha=0.3)
    return _img(_png(fig), "perplexity vs decode speed")


def frontier_figure(points: Sequence[dict], title: str = "the cost frontier") -> Figure:
    """Perplexity against $/M output tokens, one marker per variant, the Pareto frontier joined by a line.

    `points`: dicts with name, cost_per_million_output_tokens_usd (None when no fleet meets the SLO: left out),
    perplexity, on_frontier, and optionally profile_kind ("projected" points are hollow and say so)."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(111)
    shown = [p for p in points if p.get("cost_per_million_output_tokens_usd") is not None]
    for p in shown:
        x, y, projected = p["cost_per_million_output_tokens_usd"], p["perplexity"], p.get("profile_kind") == "projected"
        color = "tab:red" if p.get("on_frontier") else "tab:gray"
        ax.scatter(x, y, s=40, edgecolors=color, facecolors="none" if projected else color, zorder=3)
        ax.annotate(p["name"] + (" (projected)" if projected else ""), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    front = sorted((p for p in shown if p.get("on_frontier")),
                   key=lambda p: p["cost_per_million_output_tokens_usd"])
    if front:
        ax.step([p["cost_per_million_output_tokens_usd"] for p in front], [p["perplexity"] for p in front],
                where="post", color="tab:red", alpha=0.6, label="Pareto frontier")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("$ per million output tokens (lower is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def frontier_chart_png(points: Sequence[dict], title: str = "the cost frontier") -> str:
    """`frontier_figure` as an <img> for the report."""
    return _img(_png(frontier_figure(points, title)), "perplexity vs $ per million output tokens")


def save_figure_png(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def roofline_chart_png(profile: dict) -> str:
    """Log-log roofline: the bandwidth roof, one compute roof per known peak, measured points labelled (base64 PNG)."""
    hw = profile["hardware"]
    bw = hw["peak_bandwidth_gbs"] * 1e9
    peaks = {k: v for k, v in hw["peak_flops"].items() if v}
    # (intensity, FLOP/s, label, series): one decode series per context length, one for prefill.
    points = [(p["arithmetic_intensity"], p["achieved_flops"], f"B={p['batch_size']}",
               f"decode, context {p['context_len']}") for p in profile["decode"]]
    points += [(p.get("arithmetic_intensity") or p["flops"] / p["bytes"], p["achieved_flops"],
                f"P={p['prompt_len']}", "prefill") for p in profile["prefill"]]
    xs = [x for x, *_ in points] + [v / bw for v in peaks.values()]
    x_lo, x_hi = min(xs) / 3, max(xs) * 3
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    grid = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [bw * x for x in grid], "k--", lw=1, label=f"bandwidth {hw['peak_bandwidth_gbs']:.4g} GB/s")
    for key, peak in sorted(peaks.items(), key=lambda kv: kv[1]):
        ax.plot(grid, [min(bw * x, peak) for x in grid], lw=1.5, label=f"{key} {peak / 1e12:.4g} TFLOP/s")
    for series in dict.fromkeys(s for *_, s in points):
        sel = [(x, y, t) for x, y, t, s in points if s == series]
        ax.scatter([x for x, _, _ in sel], [y for _, y, _ in sel], marker="s" if series == "prefill" else "o",
                   zorder=3, label=series)
        for x, y, t in sel:
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"Roofline: {profile['model']['name']} on {hw['name']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def _by_context(decode: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for p in sorted(decode, key=lambda p: p["batch_size"]):
        groups.setdefault(p["context_len"], []).append(p)
    return groups


def decode_charts_png(profile: dict) -> tuple[str, str]:
    """TPOT (= decode step time) vs batch and output tokens/s vs batch, one line per context length."""
    groups = _by_context(profile["decode"])
    fig1, fig2 = Figure(figsize=(6, 4)), Figure(figsize=(6, 4))
    ax1, ax2 = fig1.add_subplot(), fig2.add_subplot()
    for ctx, pts in groups.items():
        bs = [p["batch_size"] for p in pts]
        ax1.plot(bs, [p["step_s"] * 1000 for p in pts], "o-", label=f"context {ctx}")
        ax2.plot(bs, [p["output_tokens_per_s"] for p in pts], "o-", label=f"context {ctx}")
    crossover = profile.get("crossover_batch_size")
    for ax, ylabel, title in ((ax1, "TPOT = step time (ms)", "Time per output token vs batch"),
                              (ax2, "output tokens/s", "Decode throughput vs batch")):
        if crossover:
            ax.axvline(crossover, color="grey", ls=":", label=f"roofline crossover B={crossover}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig1), _png(fig2)


def ttft_chart_png(profile: dict) -> str:
    pts = sorted(profile["prefill"], key=lambda p: p["prompt_len"])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot([p["prompt_len"] for p in pts], [p["ttft_s"] * 1000 for p in pts], "s-", label="TTFT")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token vs prompt length")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([p["prompt_len"] for p in pts], [p["prefill_tokens_per_s"] for p in pts], "^:", color="tab:orange",
             label="prefill tokens/s")
    ax2.set_ylabel("prefill tokens/s")
    fig.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.12, 0.88))
    return _png(fig)


def latency_cdf_png(bench_results: Sequence[dict]) -> str:
    """Empirical CDFs of TTFT, TPOT and E2E latency, one line per bench serve run."""
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E latency")):
        for i, r in enumerate(bench_results):
            vals = sorted(x[key] * 1000 for x in r.get("per_request", []) if x.get(key) is not None)
            if vals:
                ax.step(vals, [(j + 1) / len(vals) for j in range(len(vals))], where="post",
                        label=_run_label(r, i))
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{label} CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _run_label(r: dict, i: int) -> str:
    conc = r.get("max_concurrency")
    return f"#{i + 1} rate={r.get('request_rate')}" + (f" conc={conc}" if conc else "")


def _bench_table(results: Sequence[dict]) -> str:
    rows_spec = [("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
                 ("duration (s)", lambda r: r["duration_s"]),
                 ("request throughput (req/s)", lambda r: r["request_throughput_per_s"]),
                 ("goodput (req/s)", lambda r: r.get("request_goodput_per_s")),
                 ("output throughput (tok/s)", lambda r: r["output_throughput_tok_s"]),
                 ("total token throughput (tok/s)", lambda r: r["total_token_throughput_tok_s"])]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        for stat in ("mean", "median", "p90", "p99"):
            rows_spec.append((f"{stat} {label} (ms)", lambda r, k=f"{stat}_{name}_ms": r.get(k)))
    columns = ["metric"] + [_run_label(r, i) for i, r in enumerate(results)]
    rows = [[label] + [fn(r) for r in results] for label, fn in rows_spec]
    out = _table(columns, rows)
    for i, r in enumerate(results):
        for f in r.get("failed_requests", [])[:20]:
            out += f"<p class='muted'>run #{i + 1}: request {f['index']} failed: {html.escape(f['error'])}</p>"
    return out


def _extra_section(sec: dict) -> str:
    """{"title", "columns", "rows"} -> a table; {"title", "html"} -> trusted HTML; {"title", "text"} -> escaped."""
    out = f"<h2>{html.escape(sec.get('title', ''))}</h2>"
    if "columns" in sec:
        out += _table(sec["columns"], sec.get("rows", []))
    if "html" in sec:
        out += sec["html"]
    if "text" in sec:
        out += f"<p>{html.escape(sec['text'])}</p>"
    return out


def render_report_html(profile: Profile, bench_results: Sequence[dict] | None = None,
                       extra_sections: Sequence[dict] | None = None, title: str | None = None) -> str:
    """The report as one HTML string (see write_report_html). `bench_results` are `BenchResult.to_dict()`s, as a
    profile's `serve_runs` holds them."""
    validate_profile(profile)
    runs = list(bench_results or [])
    runs += [r for r in profile.get("serve_runs", []) if r not in runs]  # the profile may already hold them
    m, hw, kv = profile["model"], profile["hardware"], profile["kv_cache"]
    peak, peak_key = peak_flops_for(hw, m["dtype"])
    title = title or f"pernode profile: {m['name']} on {hw['name']}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='muted'>created {html.escape(profile['created_at'])}, pernode "
             f"{html.escape(profile['pernode_version'])}, schema v{profile['schema_version']}</p>"]
    if profile["kind"] == "projected":
        src = profile["projected_from"]
        warn = "".join(f"<br>warning: {html.escape(w)}" for w in src.get("warnings", []))
        parts.append(f"<div class='banner'><b>PROJECTED</b>, not measured: scaled by the roofline from a profile "
                     f"measured on {html.escape(str(src.get('hardware_name')))} ({html.escape(str(src.get('method')))})"
                     f"{warn}</div>")
    parts.append("<h2>Summary</h2>" + _table(["", "value"], [
        ("model", m["name"]), ("dtype", m["dtype"]), ("parameters", m["num_params"]),
        ("weight bytes (GB)", m["weight_bytes"] / 1e9), ("KV bytes per token", m["kv_bytes_per_token"]),
        ("hardware", hw["name"]), ("peak bandwidth (GB/s)", hw["peak_bandwidth_gbs"]),
        (f"peak FLOP/s used ({peak_key})", peak), ("ridge (FLOP/byte)", peak / (hw["peak_bandwidth_gbs"] * 1e9)),
        ("crossover batch size", profile.get("crossover_batch_size")),
        ("memory high water (GB)", None if profile.get("memory_high_water_bytes") is None
         else profile["memory_high_water_bytes"] / 1e9),
        ("peaks from", hw["peak_source"])]))
    parts.append("<h2>Roofline</h2>" + _img(roofline_chart_png(profile), "roofline chart"))
    tpot_png, tput_png = decode_charts_png(profile)
    parts.append("<h2>Decode</h2>" + _img(tpot_png, "TPOT vs batch") + _img(tput_png, "throughput vs batch"))
    parts.append(_table(["batch", "context", "step (ms)", "tokens/s", "GFLOP/step", "MB/step", "FLOP/byte",
                         "GB/s", "GFLOP/s", "of peak", "bound"],
                        [(p["batch_size"], p["context_len"], p["step_s"] * 1000, p["output_tokens_per_s"],
                          p["flops_per_step"] / 1e9, p["bytes_per_step"] / 1e6, p["arithmetic_intensity"],
                          p["achieved_gbs"], p["achieved_flops"] / 1e9, f"{p['fraction_of_peak']:.1%}", p["bound"])
                         for p in sorted(profile["decode"], key=lambda p: (p["context_len"], p["batch_size"]))]))
    parts.append("<h2>Prefill</h2>" + _img(ttft_chart_png(profile), "TTFT vs prompt length"))
    parts.append(_table(["prompt", "TTFT (ms)", "tokens/s", "GFLOP", "MB", "GFLOP/s", "of peak", "bound"],
                        [(p["prompt_len"], p["ttft_s"] * 1000, p["prefill_tokens_per_s"], p["flops"] / 1e9,
                          p["bytes"] / 1e6, p["achieved_flops"] / 1e9, f"{p['fraction_of_peak']:.1%}", p["bound"])
                         for p in sorted(profile["prefill"], key=lambda p: p["prompt_len"])]))
    parts.append("<h2>KV cache capacity</h2>" + _table(["", "value"], [
        ("memory (GiB)", hw["memory_bytes"] / 2**30), ("weights (GB)", m["weight_bytes"] / 1e9),
        ("KV cache (GB)", kv["kv_cache_bytes"] / 1e9), ("block size (tokens)", kv["block_size"]),
        ("blocks", kv["num_blocks"]), ("max tokens", kv["max_tokens"]), ("context length", kv["context_len"]),
        ("max concurrent sequences at that context", kv["max_concurrent_seqs"])]))
    if runs:
        parts.append("<h2>Serving benchmark</h2>" + _bench_table(runs) + _img(latency_cdf_png(runs), "latency CDFs"))
    for sec in extra_sections or []:
        parts.append(_extra_section(sec))
    notes = hw.get("notes") or []
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_html(path: str | os.PathLike, profile: Profile, bench_results: Sequence[dict] | None = None,
                      extra_sections: Sequence[dict] | None = None, title: str | None = None) -> Path:
    """Write the report to `path`: summary, roofline, decode and prefill charts and tables, KV capacity,
    bench serve tables and latency CDFs (from `bench_results` and the profile's `serve_runs`), extra sections
    (e.g. a plan table as {"title", "columns", "rows"}). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report_html(profile, bench_results, extra_sections, title), encoding="utf-8")
    return path
