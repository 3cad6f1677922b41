"""How long one engine step of a replica takes, from its profile (how big a batch it can run: price/max_batch.py).

One step with b running decodes and p scheduled prompt tokens lasts decode_step_s(b) + p / prefill_tokens_per_s:
the decode part is read off the measured decode[] curve in batch size, the prefill part off prefill[] in prompt length.
This additive model is the one DistServe (Zhong et al., arXiv 2401.09670) and Sarathi-Serve (Agrawal et al.,
arXiv 2403.02310) reason with for mixed prefill/decode batches. Timed alone, a mixed step is faster than that on a
CPU: in one forward pass the decodes' rows ride in the prompt chunk's GEMMs at the prefill rate instead of running
as separate GEMVs. The profile measures such steps (its mixed[] points: b decodes plus a p-token chunk in one step),
and with `mixed_steps=True` the additive estimate of a mixed step is scaled by measured / additive, interpolated in
log b and log p and held at the measured edges, as vidur predicts a batch's time from profiled batches. It is off by
default: against real fleets it predicted worse than the additive sum (docs/fleet.md, "Fidelity runs"), whose
overcount stands in for per-step serving work under load that no term models yet.

The serving path is in the model too, when the profile measured it (`pernode profile --serving-path`, section
serving_path): each request reaches the engine `serving_request_s` after it was sent (HTTP, tokenizing, the first
chunk back) and each decode step of b running requests pays what the path adds at b streams (detokenizing and
streaming b tokens, on the engine's own core): interpolated on the measured per-level curve (`per_step_curve`)
when the section has one, else `serving_step_s + b * serving_token_s`. When the section measured the engine
running slower or faster inside the serving process than in the profile (`engine_ratio`, its CPU time for the same
work), the engine's step times are scaled by it. The section names its path: `serve` (straight to `pernode
serve`) or `ray` (through Ray Serve's proxy into a pinned replica, measured at several concurrent streams,
measure/profile/serving_path_streams.py); a plan says which one it assumed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pernode.measure.profile.profile_schema import Profile


def profile_number(row: Mapping[str, Any], key: str, where: str, minimum_exclusive: float = 0.0) -> float:
    if key not in row:
        raise ValueError(f"profile {where}.{key} is missing; re-run `pernode profile` to write a complete profile")
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= minimum_exclusive:
        raise ValueError(f"profile {where}.{key}={v!r}: must be a finite number > {minimum_exclusive:g}")
    return float(v)


@dataclass(frozen=True, eq=False)
class StepTimeModel:
    """Piecewise-linear decode step time in batch size plus prompt tokens at a length-dependent rate."""

    decode_batch_sizes: np.ndarray  # float64, increasing
    decode_step_s_points: np.ndarray  # float64, as measured
    prefill_prompt_lens: np.ndarray  # float64, increasing
    prefill_tokens_per_s_points: np.ndarray
    decode_context_len: int | None = None  # the profile's context length the decode points were taken at
    serving_request_s: float = 0.0  # per request: send to engine admission, plus the first chunk's way back
    serving_token_s: float = 0.0  # per token streamed: detokenize, frame, send, on the engine's own core
    serving_step_s: float = 0.0  # per decode step with any stream running: the path's fixed work per step
    serving_path: str | None = None  # which path the serving terms were measured through: "serve", "ray", None
    idle_start_s: float = 0.0  # added to a step that starts on an idle replica (its first step after a pause)
    serving_curve_streams: np.ndarray | None = None  # measured stream counts (increasing), when the path has them
    serving_curve_s: np.ndarray | None = None  # ... and what the path adds to a decode step at each (non-decreasing)
    mixed_batch_sizes: np.ndarray | None = None  # mixed-step correction grid: decodes (increasing)
    mixed_prompt_tokens: np.ndarray | None = None  # ... prompt tokens (increasing)
    mixed_ratio: np.ndarray | None = None  # measured / additive step time, [batch, prompt tokens]
    serving_admit_s: float = 0.0  # per request admitted: the path's per-request work on the engine's core
    _mix_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_points(cls, decode: Mapping[int, float], prefill: Mapping[int, float]) -> "StepTimeModel":
        """decode: {batch_size: step_s}; prefill: {prompt_len: prefill_tokens_per_s}. Handy for tests and what-ifs."""
        rows_d = [{"batch_size": b, "step_s": s} for b, s in decode.items()]
        rows_p = [{"prompt_len": n, "prefill_tokens_per_s": r} for n, r in prefill.items()]
        return cls.from_profile({"decode": rows_d, "prefill": rows_p})

    @classmethod
    def from_profile(cls, profile: Profile, context_tokens: float | None = None,
                     mixed_steps: bool = False) -> "StepTimeModel":
        """Read decode[] and prefill[]; when decode[] covers several context lengths, use the one nearest
        `context_tokens` (ties go to the longer context, which is slower: the safe side). `mixed_steps` scales mixed
        steps by the profile's mixed[] points; off by default, since it validated worse (docs/fleet.md)."""
        decode_rows = profile.get("decode")
        prefill_rows = profile.get("prefill")
        if not isinstance(decode_rows, list) or not decode_rows:
            raise ValueError("profile decode[] is missing or empty: the planner needs at least one decode point "
                             "(batch_size, step_s); re-run `pernode profile`")
        if not isinstance(prefill_rows, list) or not prefill_rows:
            raise ValueError("profile prefill[] is missing or empty: the planner needs at least one prefill point "
                             "(prompt_len, prefill_tokens_per_s); re-run `pernode profile`")
        points: list[tuple[int | None, float, float]] = []
        for i, row in enumerate(decode_rows):
            b = profile_number(row, "batch_size", f"decode[{i}]")
            s = profile_number(row, "step_s", f"decode[{i}]")
            ctx = row.get("context_len")
            points.append((int(ctx) if isinstance(ctx, (int, float)) and not isinstance(ctx, bool) else None, b, s))
        contexts = sorted({c for c, _, _ in points if c is not None})
        chosen_ctx = None
        if len(contexts) > 1:
            target = context_tokens if context_tokens is not None else contexts[-1]
            chosen_ctx = min(contexts, key=lambda c: (abs(c - target), -c))
            points = [p for p in points if p[0] == chosen_ctx]
        elif contexts:
            chosen_ctx = contexts[0]
        # As measured, dips included: the engine's kernels change tiles and paths with the row count, so a batch of
        # 8 can step faster than one of 7 (a profile measures every batch size up to 32). The TPOT limit takes the
        # running maximum instead (max_batch.py): a replica at max batch b runs every batch below it too.
        batch, step = _merge_duplicates([p[1] for p in points], [p[2] for p in points])

        lens, rates = [], []
        for i, row in enumerate(prefill_rows):
            lens.append(profile_number(row, "prompt_len", f"prefill[{i}]"))
            rates.append(profile_number(row, "prefill_tokens_per_s", f"prefill[{i}]"))
        lens_a, rates_a = _merge_duplicates(lens, rates)
        # the engine as it runs inside the serving process, when the serving path measured it differing
        ratio = serving_engine_ratio(profile)
        step, rates_a = step * ratio, rates_a / ratio
        request_s, token_s, step_s = serving_path_s(profile)
        curve = serving_curve(profile)
        model = cls(batch, step, lens_a, rates_a, chosen_ctx, request_s, token_s, step_s,
                    serving_path_name(profile), idle_start_s(profile), *(curve or (None, None)))
        grid = _mixed_ratio_grid(model, profile.get("mixed") or [], chosen_ctx, ratio) if mixed_steps else {}
        admit_s = serving_request_cpu_s(profile)
        if admit_s:
            grid["serving_admit_s"] = admit_s
        return dataclasses.replace(model, **grid) if grid else model

    @property
    def max_measured_batch(self) -> int:
        return int(self.decode_batch_sizes[-1])

    def decode_step_s(self, batch_size: int) -> float:
        """Seconds of one step that gives `batch_size` running requests one token each; 0 for no decodes.

        Between points: linear. Below the first point: the first point's time (slower than truth, the safe side).
        Beyond the last: the last segment's slope carries on; with a single point the time stays flat, which is
        right only while decode is bound by reading the weights.
        """
        if batch_size <= 0:
            return 0.0
        return self.engine_decode_step_s(batch_size) + self.serving_decode_s(batch_size)

    def serving_decode_s(self, batch_size: int) -> float:
        """What the serving path adds to a decode step of `batch_size` streams: on the measured curve (linear between
        its stream counts, its first value below them, the last segment's slope beyond them), else a fixed part and
        a part per stream."""
        if batch_size <= 0:
            return 0.0
        c, v = self.serving_curve_streams, self.serving_curve_s
        if c is None or v is None:
            return self.serving_step_s + batch_size * self.serving_token_s
        if batch_size <= c[-1]:
            return float(np.interp(batch_size, c, v))
        slope = (v[-1] - v[-2]) / (c[-1] - c[-2]) if c.size >= 2 else v[-1] / c[-1]
        return float(v[-1] + max(slope, 0.0) * (batch_size - c[-1]))

    def engine_decode_step_s(self, batch_size: int) -> float:
        """decode_step_s without the serving path: the engine's forward and sampling alone."""
        if batch_size <= 0:
            return 0.0
        b, s = self.decode_batch_sizes, self.decode_step_s_points
        if batch_size <= b[-1]:
            return float(np.interp(batch_size, b, s))
        slope = (s[-1] - s[-2]) / (b[-1] - b[-2]) if b.size >= 2 else 0.0
        return float(s[-1] + max(slope, 0.0) * (batch_size - b[-1]))

    def mix_factor(self, num_decodes: int, prompt_tokens: int) -> float:
        """Measured / additive time of a step holding `num_decodes` decodes and `prompt_tokens` prompt tokens; 1
        for a pure step or a profile without mixed[] points."""
        if self.mixed_ratio is None or num_decodes <= 0 or prompt_tokens <= 0:
            return 1.0
        key = (num_decodes, prompt_tokens)
        factor = self._mix_cache.get(key)
        if factor is None:
            lp = np.log(self.mixed_prompt_tokens)
            per_batch = [np.interp(np.log(prompt_tokens), lp, row) for row in self.mixed_ratio]
            factor = float(np.interp(np.log(num_decodes), np.log(self.mixed_batch_sizes), per_batch))
            self._mix_cache[key] = factor
        return factor

    def prefill_tokens_per_s(self, prompt_len: float) -> float:
        """Prefill throughput for a prompt of this length; clamped to the end points outside the measured range."""
        return float(np.interp(prompt_len, self.prefill_prompt_lens, self.prefill_tokens_per_s_points))

    def prefill_s_per_token(self, prompt_len: np.ndarray | float) -> np.ndarray | float:
        return 1.0 / np.interp(prompt_len, self.prefill_prompt_lens, self.prefill_tokens_per_s_points)

    def prefill_s(self, prompt_len: float) -> float:
        """Seconds of prefill work for a whole prompt (without the decode share of the step it rides in)."""
        return prompt_len / self.prefill_tokens_per_s(prompt_len)

    def step_s(self, num_decodes: int, prompt_tokens: int = 0, prompt_len: float | None = None) -> float:
        """One step: `num_decodes` decodes plus `prompt_tokens` prompt tokens of prompts `prompt_len` long."""
        if prompt_tokens <= 0:
            return self.decode_step_s(num_decodes)
        rate = self.prefill_tokens_per_s(prompt_len if prompt_len is not None else prompt_tokens)
        engine_s = self.engine_decode_step_s(num_decodes) + prompt_tokens / rate
        return (self.decode_step_s(num_decodes) - self.engine_decode_step_s(num_decodes)
                + engine_s * self.mix_factor(num_decodes, prompt_tokens))


def _mixed_ratio_grid(model: StepTimeModel, points: list, context_len: int | None, scale: float = 1.0) -> dict:
    """The correction grid from a profile's mixed[] points (those at the decode sweep's context when it has one):
    batch sizes x prompt tokens, each cell measured / additive; a cell not measured takes its row's mean."""
    ratios: dict[tuple[int, int], float] = {}
    for i, point in enumerate(points):
        b = int(profile_number(point, "batch_size", f"mixed[{i}]"))
        p = int(profile_number(point, "prompt_tokens", f"mixed[{i}]"))
        measured = profile_number(point, "step_s", f"mixed[{i}]") * scale  # scaled as the decode and prefill points
        if context_len is not None and point.get("context_len") not in (None, context_len):
            continue
        additive = model.engine_decode_step_s(b) + p / model.prefill_tokens_per_s(p)
        ratios[(b, p)] = measured / additive
    if not ratios:
        return {}
    bs = sorted({b for b, _ in ratios})
    ps = sorted({p for _, p in ratios})
    grid = np.empty((len(bs), len(ps)))
    for i, b in enumerate(bs):
        row = [ratios.get((b, p)) for p in ps]
        mean = float(np.mean([r for r in row if r is not None]))
        grid[i] = [mean if r is None else r for r in row]
    return {"mixed_batch_sizes": np.asarray(bs, dtype=np.float64),
            "mixed_prompt_tokens": np.asarray(ps, dtype=np.float64), "mixed_ratio": grid}


def serving_path_name(profile: Profile) -> str | None:
    """The path the profile's serving terms were measured through: "serve" (an older section without a name was
    measured against `pernode serve`), "ray", or None when the profile has no serving_path."""
    section = profile.get("serving_path")
    if not isinstance(section, Mapping):
        return None
    return str(section.get("path") or "serve")


def idle_start_s(profile: Profile) -> float:
    """Seconds a step that starts on an idle replica takes beyond the profile's back-to-back timings (the
    serving_path section's `idle_start_s`, measured by `pernode profile --serving-path ... --serving-path-streams`
    in the same run as the prefill points); 0 when absent."""
    section = profile.get("serving_path")
    v = section.get("idle_start_s", 0.0) if isinstance(section, Mapping) else 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
        raise ValueError(f"profile serving_path.idle_start_s={v!r}: must be a finite number >= 0 seconds")
    return float(v)


def serving_request_cpu_s(profile: Profile) -> float:
    """CPU seconds of the serving path's own work per request on the engine's core (accepting and parsing the
    request, tokenizing, the first and last chunks): the serving_path section's `request_cpu_s`; 0 when absent.
    The simulator adds it to the step a request is admitted in. Steady streams started together spread it over
    every token of `per_step_curve`; under a live trace it lands as requests arrive
    (benchmarks/engine_step_waits.py)."""
    section = profile.get("serving_path")
    v = section.get("request_cpu_s", 0.0) if isinstance(section, Mapping) else 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or not 0 <= v <= 1.0:
        raise ValueError(f"profile serving_path.request_cpu_s={v!r}: must be a number of seconds in [0, 1]")
    return float(v)


def serving_engine_ratio(profile: Profile) -> float:
    """How much slower (> 1) or faster the engine runs inside the serving process than the profile timed it: the
    serving_path section's `engine_ratio` (serving_path_fit.engine_ratio); 1 when absent."""
    section = profile.get("serving_path")
    v = section.get("engine_ratio", 1.0) if isinstance(section, Mapping) else 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or not 0.5 <= v <= 2.0:
        raise ValueError(f"profile serving_path.engine_ratio={v!r}: must be a number in [0.5, 2]; re-run "
                         f"`pernode profile --serving-path ... --serving-path-streams`")
    return float(v)


def serving_curve(profile: Profile) -> tuple[np.ndarray, np.ndarray] | None:
    """(stream counts, seconds added per decode step) from the serving_path section's `per_step_curve`, measured
    by `pernode profile --serving-path ... --serving-path-streams`; None when the section has none."""
    section = profile.get("serving_path")
    rows = section.get("per_step_curve") if isinstance(section, Mapping) else None
    if not rows:
        return None
    streams, added = [], []
    for i, row in enumerate(rows):
        streams.append(profile_number(row, "streams", f"serving_path.per_step_curve[{i}]"))
        v = row.get("added_s") if isinstance(row, Mapping) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"profile serving_path.per_step_curve[{i}].added_s={v!r}: must be a finite number >= 0 "
                             f"seconds; re-run `pernode profile --serving-path ... --serving-path-streams`")
        added.append(float(v))
    c, v = _merge_duplicates(streams, added)
    return c, np.maximum.accumulate(v)


def serving_path_s(profile: Profile) -> tuple[float, float, float]:
    """(per-request, per-token, per-step) seconds the serving path adds, from the profile's serving_path section;
    zeros when the profile did not measure it (the plan then says it leaves the serving path out). `step_s` is
    optional (0 in sections measured one stream at a time)."""
    section = profile.get("serving_path")
    if not isinstance(section, Mapping):
        return 0.0, 0.0, 0.0
    out = []
    for key in ("request_s", "token_s", "step_s"):
        if key == "step_s" and key not in section:
            out.append(0.0)
            continue
        v = section.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"profile serving_path.{key}={v!r}: must be a finite number >= 0 seconds; re-run "
                             f"`pernode profile --serving-path`")
        out.append(float(v))
    return out[0], out[1], out[2]


def _merge_duplicates(xs: list[float], ys: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sort by x and average y over repeated x (repeated measurements of one point)."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    ux, inverse = np.unique(x, return_inverse=True)
    sums = np.zeros_like(ux)
    counts = np.zeros_like(ux)
    np.add.at(sums, inverse, y)
    np.add.at(counts, inverse, 1.0)
    return ux, sums / counts
