"""The plan's workload as `bench serve` sends it: same rate, burstiness and lengths, outputs run to their length."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pernode.measure.bench.arrivals import arrival_offsets_s
from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.bench.bench_serve import build_requests
from pernode.measure.bench.config import BenchConfig
from pernode.price.workload import LengthDist, Workload
from pernode.serve.models.registry import KNOWN_MODELS
from pernode.slo import SLO


def bench_length(dist: LengthDist, name: str) -> str:
    """`bench serve`'s form of a length: 'N' or 'LO:HI'. A trace's empirical lengths have none."""
    if dist.kind == "fixed":
        return f"{dist.lo}"
    if dist.kind == "uniform":
        return f"{dist.lo}:{dist.hi}"
    raise ValueError(f"{name}={dist.kind}: the plan's workload replays a trace, whose lengths bench serve cannot "
                     f"draw; set {name} to N or LO:HI tokens")


@dataclass(frozen=True)
class ReplayWorkload:
    """What `bench serve` sends: a rate, a burstiness and lengths in its 'N' or 'LO:HI' form."""

    rate_rps: float
    input_len: str
    output_len: str
    burstiness: float

    @classmethod
    def from_workload(cls, workload: Workload, input_len: str | None = None, output_len: str | None = None,
                  burstiness: float | None = None) -> ReplayWorkload:
        """The plan's workload, where the overrides given win."""
        return cls(rate_rps=float(workload.rate_rps),
                   input_len=input_len or bench_length(workload.input_len, "input_len"),
                   output_len=output_len or bench_length(workload.output_len, "output_len"),
                   burstiness=float(workload.burstiness if burstiness is None else burstiness))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def bench_config(self, base_url: str, num_prompts: int, seed: int, slo: SLO, tokenizer: str | None,
                     num_warmup: int) -> BenchConfig:
        """`ignore_eos`, so that every output runs to the length the plan assumed."""
        slo_text = ",".join(f"{k}={v:g}" for k, v in slo.to_dict().items() if v is not None)
        return BenchConfig(base_url=base_url, dataset="random", random_input_len=self.input_len,
                           random_output_len=self.output_len, request_rate=self.rate_rps,
                           burstiness=self.burstiness, num_prompts=num_prompts, seed=seed, ignore_eos=True,
                           num_warmup=num_warmup, percentiles="50,90,99", slo=slo_text or None, tokenizer=tokenizer)


def recorded_trace(bench: BenchConfig, result: BenchResult) -> dict[str, list]:
    """The requests `bench` sent as the simulator replays them: arrival offsets, prompt tokens (the server's count
    where it answered, else the bench's) and output tokens."""
    requests = build_requests(bench)
    offsets_s = arrival_offsets_s(len(requests), bench.request_rate, bench.burstiness, bench.seed)
    counted = [row.prompt_tokens if row.success and row.prompt_tokens else req.prompt_len
               for row, req in zip(result.per_request, requests)]
    return {"offsets_s": [float(t) for t in offsets_s], "prompt_tokens": [int(n) for n in counted],
            "output_tokens": [int(r.max_tokens) for r in requests]}


def tokenizer_path(model: str) -> str | None:
    """A tokenizer bench serve can load for exact prompt lengths: the folder's tokenizer.json or the .gguf."""
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "tokenizer.json")):
        return model
    if model.endswith(".gguf") and os.path.isfile(model):
        return model
    path = KNOWN_MODELS[model].path() if model in KNOWN_MODELS else None
    return path if path and str(path).endswith(".gguf") else None
