"""Closed-form queueing: Erlang C, M/M/c and M/M/1 waits, Little's law, and a replica's capacity.

Kleinrock, Queueing Systems Vol. 1: Theory (Wiley, 1975), sections 2.1 (Little's law, L = lambda W), 3.2 (M/M/1)
and 3.5 (M/M/c, Erlang's C formula). The wait tail P(W > t) = C(c, a) exp(-(c mu - lambda) t) is eq. (3.40)'s
conditional-exponential form; see also Gross & Harris, Fundamentals of Queueing Theory, section 2.3.
"""
from __future__ import annotations

import math

import numpy as np

from pernode.price.step_time import StepTimeModel
from pernode.price.workload import Workload


def _check_rates(rate_rps: float, service_rate_rps: float, num_servers: int) -> None:
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValueError(f"rate_rps = {rate_rps!r}: must be a finite arrival rate > 0")
    if not (service_rate_rps > 0 and math.isfinite(service_rate_rps)):
        raise ValueError(f"service_rate_rps = {service_rate_rps!r}: must be a finite service rate > 0")
    if isinstance(num_servers, bool) or not isinstance(num_servers, (int, np.integer)) or num_servers < 1:
        raise ValueError(f"num_servers = {num_servers!r}: must be a whole number >= 1")
    if rate_rps >= num_servers * service_rate_rps:
        raise ValueError(f"rate_rps = {rate_rps:g} >= num_servers * service_rate_rps = "
                         f"{num_servers * service_rate_rps:g}: the queue is unstable (utilisation >= 1); "
                         f"add servers or lower the rate")


def erlang_c(num_servers: int, offered_load_erlangs: float) -> float:
    """Probability an arrival waits in M/M/c, C(c, a) with a = lambda / mu < c.

    Computed through Erlang B's recursion B(k) = a B(k-1) / (k + a B(k-1)), which never forms a^c / c!, so it
    stays finite for thousands of servers; then C = B / (1 - rho (1 - B)).
    """
    c, a = num_servers, offered_load_erlangs
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"num_servers = {c!r}: must be a whole number >= 1")
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(f"offered_load_erlangs = {a!r}: must be a finite load >= 0")
    if a >= c:
        return 1.0  # unstable: every arrival eventually waits
    if a == 0:
        return 0.0
    b = 1.0
    for k in range(1, int(c) + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1.0 - rho * (1.0 - b))


def mmc_mean_wait_s(rate_rps: float, service_rate_rps: float, num_servers: int) -> float:
    """Mean time in queue (before service) of M/M/c: W_q = C(c, a) / (c mu - lambda)."""
    _check_rates(rate_rps, service_rate_rps, num_servers)
    c = erlang_c(num_servers, rate_rps / service_rate_rps)
    return c / (num_servers * service_rate_rps - rate_rps)


def mmc_wait_tail(t_s: float | np.ndarray, rate_rps: float, service_rate_rps: float,
                  num_servers: int) -> float | np.ndarray:
    """P(W_q > t) = C(c, a) exp(-(c mu - lambda) t) for t >= 0."""
    _check_rates(rate_rps, service_rate_rps, num_servers)
    c = erlang_c(num_servers, rate_rps / service_rate_rps)
    return c * np.exp(-(num_servers * service_rate_rps - rate_rps) * np.asarray(t_s, dtype=np.float64))


def mmc_wait_quantile_s(q: float, rate_rps: float, service_rate_rps: float, num_servers: int) -> float:
    """Smallest t with P(W_q <= t) >= q: 0 if at least a fraction q never wait, else ln(C / (1-q)) / (c mu - lambda)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q = {q!r}: a quantile must lie in (0, 1)")
    _check_rates(rate_rps, service_rate_rps, num_servers)
    c = erlang_c(num_servers, rate_rps / service_rate_rps)
    if c <= 1.0 - q:
        return 0.0
    return math.log(c / (1.0 - q)) / (num_servers * service_rate_rps - rate_rps)


def mm1_mean_wait_s(rate_rps: float, service_rate_rps: float) -> float:
    """M/M/1 mean time in queue: rho / (mu - lambda); Erlang C with one server reduces to C = rho."""
    return mmc_mean_wait_s(rate_rps, service_rate_rps, 1)


def mm1_mean_sojourn_s(rate_rps: float, service_rate_rps: float) -> float:
    """M/M/1 mean time in system: 1 / (mu - lambda)."""
    return mm1_mean_wait_s(rate_rps, service_rate_rps) + 1.0 / service_rate_rps


def littles_law_mean_in_system(rate_rps: float, mean_time_in_system_s: float) -> float:
    """L = lambda W: mean number in system from arrival rate and mean time in system."""
    return rate_rps * mean_time_in_system_s


def littles_law_mean_time_s(mean_in_system: float, rate_rps: float) -> float:
    """W = L / lambda."""
    if rate_rps <= 0:
        raise ValueError(f"rate_rps = {rate_rps!r}: must be > 0")
    return mean_in_system / rate_rps


def time_average_in_system(arrival_s: np.ndarray, departure_s: np.ndarray,
                           t_start_s: float | None = None, t_end_s: float | None = None) -> float:
    """Time-averaged number of customers present over [t_start, t_end], measured from a trace by sweeping its
    arrival and departure events (the left side of Little's law, computed without using sojourn times)."""
    a = np.asarray(arrival_s, dtype=np.float64)
    d = np.asarray(departure_s, dtype=np.float64)
    t0 = float(a.min()) if t_start_s is None else t_start_s
    t1 = float(d.max()) if t_end_s is None else t_end_s
    times = np.concatenate([a, d])
    steps = np.concatenate([np.ones_like(a), -np.ones_like(d)])
    order = np.argsort(times, kind="stable")
    times, steps = np.clip(times[order], t0, t1), steps[order]
    count_after = np.cumsum(steps)
    area = float(np.sum(count_after[:-1] * np.diff(times)))
    return area / (t1 - t0)


def request_service_s(step_model: StepTimeModel, batch_size: int, workload: Workload,
                      num_samples: int = 4096, seed: int = 0) -> float:
    """Mean time one request holds a batch slot when the replica runs full at `batch_size`.

    A request takes about one step per output token (its first token comes from its last prefill step). At full
    batch each step carries b decodes, plus the prompts of the requests that replace finishers: b requests turn
    over every mean-output steps, so the slot's time is mean_out * decode_step_s(b) + b * E[prefill seconds].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: must be >= 1")
    rng = np.random.default_rng(seed)
    prompt, _ = workload.sample_lengths(rng, num_samples)
    mean_prefill_s = float(np.mean(prompt * step_model.prefill_s_per_token(prompt)))
    return workload.mean_output_tokens * step_model.decode_step_s(batch_size) + batch_size * mean_prefill_s


def replica_capacity_rps(step_model: StepTimeModel, batch_size: int, workload: Workload) -> float:
    """Requests per second one replica sustains at `batch_size`: batch / mean slot service time."""
    return batch_size / request_service_s(step_model, batch_size, workload)
