"""The result of one `bench serve` run, typed: what was sent, the serving metrics (vLLM benchmark_serving's
definitions, see serving_metrics.py), the failures and one row per request.

`BenchResult.to_dict()` is the JSON the tool writes (`--out`, a profile's `serve_runs`), under vLLM's key names
(`median_ttft_ms`, `p99_tpot_ms`, `request_goodput_per_s`, ...); `BenchResult.from_dict()` reads it back.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pernode.measure.bench.serving_metrics import percentile_key
from pernode.records import read_json

KIND = "bench_serve"
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")  # vLLM's names; e2el is the end-to-end latency


@dataclass(frozen=True)
class LatencyStats:
    """One latency metric over a run, in milliseconds; None where no request gave a value (not "0 ms")."""

    mean_ms: float | None
    median_ms: float | None
    std_ms: float | None
    percentiles_ms: tuple[tuple[float, float | None], ...] = ()  # (p, value) in the run's percentile order

    def percentile_ms(self, p: float) -> float | None:
        for q, value in self.percentiles_ms:
            if q == p:
                return value
        raise KeyError(f"percentile {p:g} was not computed; have {[q for q, _ in self.percentiles_ms]}")

    def to_dict(self, name: str) -> dict[str, float | None]:
        out = {f"mean_{name}_ms": self.mean_ms, f"median_{name}_ms": self.median_ms, f"std_{name}_ms": self.std_ms}
        out.update({percentile_key(p, name): value for p, value in self.percentiles_ms})
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str, percentiles: tuple[float, ...]) -> LatencyStats:
        return cls(d[f"mean_{name}_ms"], d[f"median_{name}_ms"], d[f"std_{name}_ms"],
                   tuple((p, d[percentile_key(p, name)]) for p in percentiles))


@dataclass(frozen=True)
class FailedRequest:
    index: int
    error: str

    def to_dict(self) -> dict:
        return {"index": self.index, "error": self.error}


@dataclass(frozen=True)
class RequestRecord:
    """One request of the run: times relative to its send, in seconds; None/() when it failed."""

    index: int
    success: bool
    error: str
    prompt_tokens: int
    output_tokens: int
    requested_output_tokens: int | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itl_s: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"index": self.index, "success": self.success, "error": self.error,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "requested_output_tokens": self.requested_output_tokens, "ttft_s": self.ttft_s,
                "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "itl_s": list(self.itl_s)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestRecord:
        return cls(d["index"], d["success"], d["error"], d["prompt_tokens"], d["output_tokens"],
                   d["requested_output_tokens"], d["ttft_s"], d["tpot_s"], d["e2e_s"], tuple(d["itl_s"]))


@dataclass(frozen=True)
class ServingMetrics:
    """What `compute_serving_metrics` measures: counts, throughputs, goodput and the four latency metrics."""

    num_requests: int
    completed: int
    failed_requests: tuple[FailedRequest, ...]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_per_s: float
    output_throughput_tok_s: float
    total_token_throughput_tok_s: float
    slo: Mapping[str, float]  # the SLO in milliseconds (ttft_ms, tpot_ms, e2e_ms); {} when none was given
    good_requests: int | None  # None without an SLO
    request_goodput_per_s: float | None
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats

    @property
    def failed(self) -> int:
        return len(self.failed_requests)

    def latency(self, name: str) -> LatencyStats:
        if name not in LATENCY_METRICS:
            raise KeyError(f"latency metric {name!r}: one of {', '.join(LATENCY_METRICS)}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        out = {"num_requests": self.num_requests, "completed": self.completed, "failed": self.failed,
               "failed_requests": [f.to_dict() for f in self.failed_requests], "duration_s": self.duration_s,
               "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
               "request_throughput_per_s": self.request_throughput_per_s,
               "output_throughput_tok_s": self.output_throughput_tok_s,
               "total_token_throughput_tok_s": self.total_token_throughput_tok_s, "slo": dict(self.slo),
               "good_requests": self.good_requests, "request_goodput_per_s": self.request_goodput_per_s}
        for name in LATENCY_METRICS:
            out.update(self.latency(name).to_dict(name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], percentiles: tuple[float, ...]) -> ServingMetrics:
        failed = tuple(FailedRequest(f["index"], f["error"]) for f in d["failed_requests"])
        if d.get("failed", len(failed)) != len(failed):
            raise ValueError(f"failed={d['failed']}: the result lists {len(failed)} failed_requests")
        return cls(d["num_requests"], d["completed"], failed, d["duration_s"], d["total_input_tokens"],
                   d["total_output_tokens"], d["request_throughput_per_s"], d["output_throughput_tok_s"],
                   d["total_token_throughput_tok_s"], dict(d["slo"] or {}), d["good_requests"],
                   d["request_goodput_per_s"],
                   *(LatencyStats.from_dict(d, name, percentiles) for name in LATENCY_METRICS))


@dataclass(frozen=True)
class BenchResult:
    """One `bench serve` run: the workload as sent, its metrics, notes for the reader, one row per request."""

    started_at: str  # ISO 8601, UTC
    base_url: str
    model: str
    endpoint: str  # completions | chat | mixed
    dataset: str
    dataset_path: str | None
    num_prompts: int
    request_rate: float  # mean requests/s; math.inf = all at once ("inf" in the JSON)
    burstiness: float
    max_concurrency: int | None
    seed: int
    ignore_eos: bool
    percentiles: tuple[float, ...]
    metrics: ServingMetrics
    notes: tuple[str, ...] = ()
    per_request: tuple[RequestRecord, ...] = ()

    def to_dict(self) -> dict:
        return {
            "kind": KIND, "started_at": self.started_at, "base_url": self.base_url, "model": self.model,
            "endpoint": self.endpoint, "dataset": self.dataset, "dataset_path": self.dataset_path,
            "num_prompts": self.num_prompts,
            # JSON has no infinity; "inf" keeps the file readable by every parser.
            "request_rate": "inf" if math.isinf(self.request_rate) else self.request_rate,
            "burstiness": self.burstiness, "max_concurrency": self.max_concurrency, "seed": self.seed,
            "ignore_eos": self.ignore_eos, "percentiles": list(self.percentiles),
            **self.metrics.to_dict(),
            "notes": list(self.notes),
            "per_request": [r.to_dict() for r in self.per_request],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchResult:
        if d.get("kind") != KIND:
            raise ValueError(f"kind={d.get('kind')!r}: not a bench serve result (expected {KIND!r})")
        try:
            percentiles = tuple(float(p) for p in d["percentiles"])
            return cls(d["started_at"], d["base_url"], d["model"], d["endpoint"], d["dataset"], d["dataset_path"],
                       d["num_prompts"], float(d["request_rate"]), d["burstiness"], d["max_concurrency"], d["seed"],
                       bool(d["ignore_eos"]), percentiles, ServingMetrics.from_dict(d, percentiles),
                       tuple(d.get("notes", ())), tuple(RequestRecord.from_dict(r) for r in d.get("per_request", ())))
        except KeyError as e:
            raise ValueError(f"bench serve result: {e.args[0]} is missing") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BenchResult:
        """Read a result file that `bench serve --out` wrote; the error names the file."""
        data = read_json(path, "bench result")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
