"""What one `bench serve` run sends, to which server, and how it reports: the library's input, built by the CLI
from flags or by a job (`fleet validate`) directly. Names follow vLLM's benchmark_serving where one exists."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"  # server root, with or without /v1
    model: str | None = None  # default: the first of GET /v1/models
    api_key: str | None = None
    request_timeout_s: float = 600.0  # longest wait for the next byte of a response
    dataset: str = "random"  # random | jsonl | chat
    dataset_path: str | None = None
    random_input_len: str = "512"  # N or MIN:MAX tokens
    random_output_len: str = "128"
    jsonl_max_tokens: int = 256  # for JSONL lines that give none
    tokenizer: str | None = None  # tokenizer.json, its folder or a .gguf, for exact prompt token counts
    num_prompts: int = 100
    request_rate: float = math.inf  # mean requests/s; inf sends all at once
    burstiness: float = 1.0  # gamma shape of the arrival gaps: 1 = Poisson
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    num_warmup: int = 1
    slo: str | None = None  # e.g. ttft_ms=500,tpot_ms=50
    percentiles: str = "50,90,99"
    out: str | None = None  # write the result JSON here
    no_progress: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"bench config: unknown settings {sorted(unknown)}; allowed {sorted(names)}")
        return cls(**d)
