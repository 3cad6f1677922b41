"""What one benchmark run does, as frozen settings: `BenchConfig` for `bench serve` (what it sends, to which server,
how it reports) and `OfflineBenchConfig` for `bench offline`. The CLI builds them from flags, a job (`fleet validate`)
directly. Their text settings (token ranges, percentiles) are parsed here and nowhere else, and a bad value fails
when the config is made, naming the setting. Names follow vLLM's benchmark_serving where one exists."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pernode.measure.bench.arrivals import check_rate
from pernode.measure.bench.datasets import DATASETS
from pernode.records import known_fields

OFFLINE_PEERS = ("hf", "llama.cpp")


def split_token_range(text: str, name: str) -> tuple[int, int]:
    """'512' -> (512, 512); '256:1024' -> (256, 1024): the syntax of a token range, values unchecked."""
    lo_s, sep, hi_s = str(text).strip().partition(":")
    try:
        lo = int(lo_s)
        return lo, int(hi_s) if sep else lo
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected N or MIN:MAX tokens, e.g. 512 or 256:1024") from None


def parse_token_range(text: str, name: str) -> tuple[int, int]:
    """`split_token_range` with 1 <= MIN <= MAX: tokens, both ends inclusive. `name` is the setting."""
    lo, hi = split_token_range(text, name)
    if lo < 1 or hi < lo:
        raise ValueError(f"{name}={text!r}: need 1 <= MIN <= MAX tokens (got MIN={lo}, MAX={hi})")
    return lo, hi


def parse_percentiles(text: str, name: str = "percentiles") -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0); each in [0, 100]."""
    try:
        ps = tuple(float(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated numbers, e.g. 50,90,99") from None
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise ValueError(f"{name}={text!r}: each must be in [0, 100], e.g. 50,90,99")
    return ps


def server_root(url: str) -> str:
    """The server's root URL: no trailing slash, no /v1 (requests add their own path)."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url={url!r}: must start with http:// or https://, e.g. http://127.0.0.1:8000")
    return url


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

    def __post_init__(self) -> None:
        server_root(self.base_url)
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}: allowed {', '.join(DATASETS)}")
        if self.dataset == "jsonl" and not self.dataset_path:
            raise ValueError("dataset_path=None: dataset='jsonl' needs a FILE.jsonl of prompts")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts}: allowed >= 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency}: allowed >= 1 (or unset for no cap)")
        if self.jsonl_max_tokens < 1:
            raise ValueError(f"jsonl_max_tokens={self.jsonl_max_tokens}: allowed >= 1")
        if self.num_warmup < 0:
            raise ValueError(f"num_warmup={self.num_warmup}: allowed >= 0")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s}: allowed > 0 seconds")
        check_rate(self.request_rate, self.burstiness)
        # parsed now so that a bad value fails before any request is sent, naming its setting
        _ = (self.input_len_range, self.output_len_range, self.percentile_values)

    @property
    def server_url(self) -> str:
        return server_root(self.base_url)

    @property
    def input_len_range(self) -> tuple[int, int]:
        return parse_token_range(self.random_input_len, "random_input_len")

    @property
    def output_len_range(self) -> tuple[int, int]:
        return parse_token_range(self.random_output_len, "random_output_len")

    @property
    def percentile_values(self) -> tuple[float, ...]:
        return parse_percentiles(self.percentiles)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        d = known_fields(cls, d, "bench settings")
        if isinstance(d.get("request_rate"), str):  # "inf", as result files write it
            d = {**d, "request_rate": float(d["request_rate"])}
        return cls(**d)


@dataclass(frozen=True)
class OfflineBenchConfig:
    """`bench offline`: one seeded workload, submitted at once, run by pernode and by the `peers`."""

    num_prompts: int = 128
    input_len: str = "32:512"  # N or MIN:MAX tokens
    output_len: str = "16:256"
    seed: int = 0
    peers: tuple[str, ...] = OFFLINE_PEERS  # of OFFLINE_PEERS; () for pernode alone
    hf_batch_sizes: tuple[int, ...] = (8, 16, 32)  # static batch sizes HF transformers is swept over
    hf_sweep_prompts: int = 32  # requests used to pick HF's best batch size
    also_dtypes: tuple[str, ...] = ()  # also run pernode in these dtypes, e.g. ("bfloat16",)
    llama_cpp_gguf: str | None = None  # the GGUF llama.cpp runs; default: the model when it is a GGUF

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts}: allowed >= 1")
        unknown = sorted(set(self.peers) - set(OFFLINE_PEERS))
        if unknown:
            raise ValueError(f"peers={','.join(unknown)}: unknown; allowed {', '.join(OFFLINE_PEERS)} or none")
        if not self.hf_batch_sizes or any(b < 1 for b in self.hf_batch_sizes):
            raise ValueError(f"hf_batch_sizes={','.join(map(str, self.hf_batch_sizes))}: each allowed >= 1")
        if self.hf_sweep_prompts < 1:
            raise ValueError(f"hf_sweep_prompts={self.hf_sweep_prompts}: allowed >= 1")
        _ = (self.input_len_range, self.output_len_range)  # fail now, naming the setting

    @property
    def input_len_range(self) -> tuple[int, int]:
        return parse_token_range(self.input_len, "input_len")

    @property
    def output_len_range(self) -> tuple[int, int]:
        return parse_token_range(self.output_len, "output_len")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OfflineBenchConfig:
        d = known_fields(cls, d, "offline bench settings")
        tuples = {k: tuple(d[k]) for k in ("peers", "hf_batch_sizes", "also_dtypes") if k in d}
        return cls(**{**d, **tuples})
