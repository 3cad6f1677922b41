"""A serving workload: how often requests arrive and how long their prompts and outputs are.

Arrivals are a renewal process with gamma inter-arrival times; shape 1 is the Poisson process of queueing theory.
`burstiness` follows vLLM's `benchmark_serving.py` convention (gamma shape = burstiness, mean 1/rate), so a figure
a user tuned there means the same here: below 1 is burstier than Poisson, above 1 is smoother.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from pernode.measure.bench.config import split_token_range
from pernode.records import CHARS_PER_TOKEN, estimate_tokens, iter_jsonl

# A crude estimate for English text with BPE tokenizers; only used when the trace has raw text and no tokenizer.
LENGTH_KINDS = ("fixed", "uniform", "empirical")
# The only arrival process so far: a gamma renewal process (`burstiness` is its shape; 1 is Poisson).
ARRIVAL_PROCESS = "gamma"


def _positive_int(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{field_name}={value!r}: must be a whole number of tokens >= 1")
    return int(value)


@dataclass(frozen=True, eq=False)
class LengthDist:
    """A distribution of token counts: fixed, uniform on [lo, hi] inclusive, or an empirical list."""

    kind: Literal["fixed", "uniform", "empirical"]
    lo: int
    hi: int
    values: np.ndarray | None = None  # empirical only

    def __eq__(self, other: object) -> bool:  # by value: the empirical list is an array
        if not isinstance(other, LengthDist):
            return NotImplemented
        same_values = (self.values is None and other.values is None) or (
            self.values is not None and other.values is not None and np.array_equal(self.values, other.values))
        return (self.kind, self.lo, self.hi) == (other.kind, other.lo, other.hi) and same_values

    def __hash__(self) -> int:
        return hash((self.kind, self.lo, self.hi))

    @classmethod
    def fixed(cls, tokens: int, field_name: str = "length") -> "LengthDist":
        n = _positive_int(tokens, field_name)
        return cls("fixed", n, n)

    @classmethod
    def uniform(cls, lo: int, hi: int, field_name: str = "length") -> "LengthDist":
        lo_i, hi_i = _positive_int(lo, f"{field_name}.lo"), _positive_int(hi, f"{field_name}.hi")
        if hi_i < lo_i:
            raise ValueError(f"{field_name}={lo_i}:{hi_i}: the high end must be >= the low end")
        return cls("uniform", lo_i, hi_i)

    @classmethod
    def empirical(cls, values: Sequence[int] | np.ndarray, field_name: str = "length") -> "LengthDist":
        arr = np.asarray(values)
        if arr.size == 0:
            raise ValueError(f"{field_name}: the empirical list is empty; give at least one length")
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 1:
            raise ValueError(f"{field_name}: every empirical length must be a whole number >= 1 "
                             f"(smallest seen: {arr.min()!r})")
        arr = arr.astype(np.int64)
        return cls("empirical", int(arr.min()), int(arr.max()), arr)

    @classmethod
    def parse(cls, text: str, field_name: str = "length") -> "LengthDist":
        """'256' is fixed, '128:512' is uniform on [128, 512]: the token-range form bench serve takes too."""
        lo, hi = split_token_range(text, field_name)
        return cls.fixed(lo, field_name) if ":" not in str(text) else cls.uniform(lo, hi, field_name)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field_name: str = "length") -> "LengthDist":
        """The inverse of `to_dict`: {"kind": "uniform", "lo": 128, "hi": 512}, or "values" for empirical."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{field_name}={d!r}: expected an object with kind, lo, hi (or values)")
        kind = d.get("kind")
        if kind == "fixed":
            dist = cls.fixed(d.get("lo"), field_name)  # type: ignore[arg-type]
            if d.get("hi", dist.hi) != dist.hi:
                raise ValueError(f"{field_name}.hi={d.get('hi')!r}: a fixed length has hi == lo = {dist.lo}")
            return dist
        if kind == "uniform":
            return cls.uniform(d.get("lo"), d.get("hi"), field_name)  # type: ignore[arg-type]
        if kind == "empirical":
            values = d.get("values")
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{field_name}.values={values!r}: an empirical length needs its list of values")
            return cls.empirical(values, field_name)
        raise ValueError(f"{field_name}.kind={kind!r}: one of {', '.join(LENGTH_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "lo": self.lo, "hi": self.hi}
        if self.kind == "empirical":
            d["values"] = self.values.tolist()
        return d

    @property
    def mean(self) -> float:
        if self.kind == "empirical":
            return float(self.values.mean())
        return (self.lo + self.hi) / 2.0

    def quantile(self, q: float) -> float:
        if self.kind == "fixed":
            return float(self.lo)
        if self.kind == "uniform":
            return self.lo + q * (self.hi - self.lo)
        return float(np.quantile(self.values, q))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.lo, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
        return self.values[rng.integers(0, self.values.size, size=n)]

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.lo}"
        if self.kind == "uniform":
            return f"uniform {self.lo}..{self.hi}"
        return f"empirical n={self.values.size}, mean {self.mean:.0f}, max {self.hi}"


@dataclass(frozen=True)
class RequestTrace:
    """A concrete list of requests, sorted by arrival time."""

    arrival_s: np.ndarray  # float64 [n]
    prompt_tokens: np.ndarray  # int64 [n]
    output_tokens: np.ndarray  # int64 [n]
    # Each prompt's token ids, when known (a recorded trace): the simulated prefix cache then hits as the engine's
    # does. Without them every prompt is taken as unique.
    prompt_token_ids: Sequence[Sequence[int]] | None = None

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0


@dataclass(frozen=True)
class Workload:
    """Request rate, length distributions and burstiness; `generate` draws a seeded trace from them."""

    rate_rps: float
    input_len: LengthDist
    output_len: LengthDist
    burstiness: float = 1.0
    # A trace's prompt and output lengths are correlated (long questions, long answers); sampling rows keeps that.
    paired: bool = False
    source: str = "synthetic"
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rate_rps, bool) or not (isinstance(self.rate_rps, (int, float))
                                                   and math.isfinite(self.rate_rps) and self.rate_rps > 0):
            raise ValueError(f"rate_rps={self.rate_rps!r}: must be a finite number of requests per second > 0")
        if isinstance(self.burstiness, bool) or not (isinstance(self.burstiness, (int, float))
                                                     and math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"burstiness={self.burstiness!r}: must be > 0 (1 = Poisson, < 1 burstier, "
                             f"> 1 smoother)")
        for name in ("input_len", "output_len"):
            if not isinstance(getattr(self, name), LengthDist):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a LengthDist")
        if self.paired:
            a, b = self.input_len, self.output_len
            if a.kind != "empirical" or b.kind != "empirical" or a.values.size != b.values.size:
                raise ValueError("paired=True: needs empirical input and output lengths of the same size "
                                 "(rows of one trace)")
        object.__setattr__(self, "notes", tuple(self.notes))

    def to_dict(self) -> dict[str, Any]:
        """The structure, so a reader rebuilds the same workload (`from_dict`) rather than parsing `describe()`."""
        return {"rate_rps": self.rate_rps, "arrival_process": ARRIVAL_PROCESS, "burstiness": self.burstiness,
                "input_len": self.input_len.to_dict(), "output_len": self.output_len.to_dict(),
                "paired": self.paired, "source": self.source, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Workload":
        """The inverse of `to_dict`; extra keys (a plan's description and means) are ignored."""
        if not isinstance(d, Mapping):
            raise ValueError(f"workload={d!r}: expected an object with rate_rps, input_len and output_len")
        missing = [k for k in ("rate_rps", "input_len", "output_len") if k not in d]
        if missing:
            raise ValueError(f"workload: missing {', '.join(missing)} (written by an older pernode? re-run "
                             f"`pernode plan`)")
        process = d.get("arrival_process", ARRIVAL_PROCESS)
        if process != ARRIVAL_PROCESS:
            raise ValueError(f"workload.arrival_process={process!r}: only {ARRIVAL_PROCESS!r} is known")
        notes = d.get("notes") or ()
        return cls(d["rate_rps"], LengthDist.from_dict(d["input_len"], "workload.input_len"),
                   LengthDist.from_dict(d["output_len"], "workload.output_len"), d.get("burstiness", 1.0),
                   bool(d.get("paired", False)), str(d.get("source", "synthetic")), tuple(str(n) for n in notes))

    @property
    def mean_input_tokens(self) -> float:
        return self.input_len.mean

    @property
    def mean_output_tokens(self) -> float:
        return self.output_len.mean

    @property
    def mean_context_tokens(self) -> float:
        """Tokens a request holds in the KV cache when it finishes: its prompt plus its output."""
        return self.mean_input_tokens + self.mean_output_tokens

    @property
    def max_context_tokens(self) -> int:
        if self.paired:
            return int((self.input_len.values + self.output_len.values).max())
        return self.input_len.hi + self.output_len.hi

    def sample_lengths(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.paired:
            rows = rng.integers(0, self.input_len.values.size, size=n)
            return self.input_len.values[rows], self.output_len.values[rows]
        return self.input_len.sample(rng, n), self.output_len.sample(rng, n)

    def generate(self, num_requests: int, seed: int = 0) -> RequestTrace:
        """`num_requests` arrivals starting at t = 0, with lengths drawn independently of arrival times."""
        if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
            raise ValueError(f"num_requests={num_requests!r}: must be a whole number >= 1")
        rng = np.random.default_rng(seed)
        # Gamma with shape k and scale 1/(rate k) has mean 1/rate and squared coefficient of variation 1/k.
        gaps_s = rng.gamma(self.burstiness, 1.0 / (self.rate_rps * self.burstiness), size=num_requests)
        gaps_s[0] = 0.0
        arrival_s = np.cumsum(gaps_s)
        prompt, output = self.sample_lengths(rng, num_requests)
        return RequestTrace(arrival_s, prompt.astype(np.int64), output.astype(np.int64))

    def describe(self) -> str:
        """For people only: readers of a plan use `to_dict`'s structure."""
        b = "Poisson" if self.burstiness == 1 else f"gamma burstiness {self.burstiness:g}"
        return (f"{self.rate_rps:g} req/s ({b}), input {self.input_len.describe()}, "
                f"output {self.output_len.describe()} [{self.source}]")

    @classmethod
    def from_trace(cls, path: str | os.PathLike, rate_rps: float, burstiness: float = 1.0,
                   count_tokens: Callable[[str], int] | None = None) -> "Workload":
        """Lengths from a JSONL trace; arrival times still come from `rate_rps` and `burstiness`.

        Each line holds either `prompt_tokens` and `output_tokens` (counts), or `prompt` (text) and `max_tokens`.
        Text is counted with `count_tokens` when given, else at CHARS_PER_TOKEN characters a token. `max_tokens`
        is taken as the output length: a planner must assume a request may run to its limit.
        """
        prompts: list[int] = []
        outputs: list[int] = []
        estimated = 0
        for where, row in iter_jsonl(path):
            if "prompt_tokens" in row and "output_tokens" in row:
                p = _positive_int(row["prompt_tokens"], f"{where}: prompt_tokens")
                o = _positive_int(row["output_tokens"], f"{where}: output_tokens")
            elif "prompt" in row and "max_tokens" in row:
                text = row["prompt"]
                if not isinstance(text, str):
                    raise ValueError(f"{where}: prompt must be a string, got {type(text).__name__}")
                if count_tokens is not None:
                    p = max(1, int(count_tokens(text)))
                else:
                    p = estimate_tokens(text)
                    estimated += 1
                o = _positive_int(row["max_tokens"], f"{where}: max_tokens")
            else:
                raise ValueError(f"{where}: needs prompt_tokens and output_tokens, or prompt and max_tokens; "
                                 f"found keys {sorted(row)}")
            prompts.append(p)
            outputs.append(o)
        if not prompts:
            raise ValueError(f"{os.fspath(path)}: the trace has no requests")
        notes = []
        if estimated:
            notes.append(f"{estimated} prompt lengths estimated at {CHARS_PER_TOKEN:g} chars/token "
                         f"(pass a tokenizer for exact counts)")
        return cls(rate_rps, LengthDist.empirical(prompts, "trace prompt_tokens"),
                   LengthDist.empirical(outputs, "trace output_tokens"), burstiness, paired=True,
                   source=f"trace {os.path.basename(os.fspath(path))}", notes=tuple(notes))
