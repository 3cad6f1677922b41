"""From a per-node profile, a workload and an SLO to the cheapest replica count that meets it, and its bill.

Two stages: queueing theory gives a first guess (the fleet as M/M/c with c = replicas x batch slots, Erlang C for
the wait; Kleinrock 1975, see queueing.py), then the discrete-event simulator (simulator.py) replays one seeded trace
at each candidate size and the search keeps the smallest size whose SLO attainment reaches the target. The same
trace at every size (common random numbers) makes sizes comparable and the search stable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pernode.measure.profile.profile_schema import Profile
from pernode.price.fleet_plan import Plan, PlanPoint
from pernode.price.fleet_result import FleetSimResult
from pernode.price.intervals import DEFAULT_INTERVAL_SEEDS, seed_intervals
from pernode.price.plan_basis import measured_basis, projection_assumptions
from pernode.price.pricing import Price, resolve_price
from pernode.price.queueing import erlang_c, mmc_wait_quantile_s, replica_capacity_rps, request_service_s
from pernode.price.simulator import ROUTERS, ReplicaConfig, simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.max_batch import BatchLimit, kv_block_size, kv_max_tokens, max_batch_size
from pernode.price.workload import Workload
from pernode.slo import SLO

__all__ = ["HOURS_PER_MONTH", "Comparison", "Plan", "PlanPoint", "compare_plans", "min_replicas_for_utilisation",
           "plan", "profile_label"]

HOURS_PER_MONTH = 730.0  # 8760 h / 12, the cloud providers' billing month


def profile_label(profile: Profile) -> tuple[str, str, str, str, str | None]:
    """(label, kind, model name, hardware name, projected_from) for display; projections always say so."""
    model = profile.get("model") or {}
    hardware = profile.get("hardware") or {}
    model_name = str(model.get("name", "unknown model"))
    hw_name = str(hardware.get("name", "unknown hardware"))
    kind = str(profile.get("kind", "measured"))
    src = profile.get("projected_from")
    if isinstance(src, Mapping):
        src = src.get("hardware_name") or src.get("name") or src.get("hardware") or str(dict(src))
    projected_from = None if src is None else str(src)
    label = f"{model_name} on {hw_name}"
    if kind == "projected":
        label += f" (projected from {projected_from or 'another node'} to {hw_name})"
    return label, kind, model_name, hw_name, projected_from


def _check_fraction(value: Any, name: str, lo_open: bool, lo: float, hi: float, hi_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r}: must lie in {rng}")
    return float(value)


def _check_whole(value: Any, name: str, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a whole number{what} >= {minimum}")


def min_replicas_for_utilisation(rate_rps: float, capacity_rps: float, headroom: float) -> int:
    """Smallest N with rate / (N capacity) < 1 - headroom.

    Enforced on the final answer too: a finite simulated trace can hide an overloaded fleet whose queue grows
    slowly, and headroom is the user's spare capacity for bursts the trace does not contain.
    """
    return math.floor(rate_rps / (capacity_rps * (1.0 - headroom))) + 1


def plan(profile: Profile, workload: Workload, slo: SLO, price_per_node_hour: float | None = None,
         headroom: float = 0.0, policy: str = "least_outstanding", attainment_target: float = 0.99, *,
         instance: str | None = None, num_requests: int = 4000, seed: int = 0, token_budget: int = 2048,
         max_replicas: int | None = None, interval_seeds: int = DEFAULT_INTERVAL_SEEDS,
         replicas: int | None = None) -> Plan:
    """The smallest replica count whose simulated SLO attainment reaches `attainment_target`, and its cost; the
    chosen fleet's latencies and goodput also as ranges over `interval_seeds` seeded traces (1: no range)."""
    headroom = _check_fraction(headroom, "headroom", False, 0.0, 1.0, True)
    attainment_target = _check_fraction(attainment_target, "attainment_target", True, 0.0, 1.0, False)
    if policy not in ROUTERS:
        raise ValueError(f"policy={policy!r}: one of {', '.join(ROUTERS)}")
    _check_whole(num_requests, "num_requests", 100, " (more is steadier)")
    _check_whole(token_budget, "token_budget", 2, " of tokens per step")
    _check_whole(interval_seeds, "interval_seeds", 1, "")
    if max_replicas is not None:
        _check_whole(max_replicas, "max_replicas", 1, "")
    if replicas is not None:  # a fleet of this size, evaluated rather than searched for
        _check_whole(replicas, "replicas", 1, "")
        max_replicas = replicas
    if slo.is_empty:
        raise ValueError("slo=none: set at least one of ttft_ms, tpot_ms, e2e_ms")
    price = resolve_price(price_per_node_hour, instance)

    label, kind, model_name, hw_name, projected_from = profile_label(profile)
    notes = list(workload.notes)
    if kind == "projected":
        notes.append(f"profile is projected, not measured: {label}; the plan inherits the projection's error")
    # Decode runs over a request's whole life, so its mean context is the prompt plus half the output.
    mean_decode_context = workload.mean_input_tokens + workload.mean_output_tokens / 2.0
    step_model = StepTimeModel.from_profile(profile, context_tokens=mean_decode_context)
    if step_model.decode_context_len is not None:
        notes.append(f"decode step times taken at context {step_model.decode_context_len} tokens "
                     f"(workload mean decode context {mean_decode_context:.0f})")
    kv_tokens = kv_max_tokens(profile)
    block_size = kv_block_size(profile)
    _check_fits(profile, workload, kv_tokens)
    # One KV rule with the simulator and the engine: blocks held on average over a request's life.
    mb = max_batch_size(step_model, kv_tokens, workload.mean_context_tokens, slo.tpot_s, token_budget,
                        mean_prompt_tokens=workload.mean_input_tokens, mean_output_tokens=workload.mean_output_tokens,
                        block_size=block_size)
    if mb.extrapolated:
        notes.append(f"max batch {mb.batch_size} is beyond the largest profiled decode batch "
                     f"{step_model.max_measured_batch}: its step time is extrapolated")
        if step_model.decode_batch_sizes.size == 1:
            notes.append("decode[] has one batch size, so the step time is taken as flat in batch size: true only "
                         "while decode is memory-bound; profile larger batches before trusting this plan")

    common = dict(profile_label=label, profile_kind=kind, model_name=model_name, hardware_name=hw_name,
                  projected_from=projected_from, workload=workload, slo=slo, attainment_target=attainment_target,
                  headroom=headroom, policy=policy, max_batch=mb, token_budget=token_budget, price=price, seed=seed,
                  notes=tuple(notes), rests_on=measured_basis(profile, step_model),
                  assumptions=projection_assumptions(profile))
    if mb.batch_size < 1:
        if mb.limited_by == BatchLimit.TPOT_SLO:
            why = (f"no batch meets tpot {slo.tpot_s * 1000:g} ms: one decode step at batch 1 takes "
                   f"{step_model.decode_step_s(1) * 1000:.1f} ms on this node")
        else:
            why = (f"the KV cache ({kv_tokens} tokens) cannot hold one request of mean context "
                   f"{workload.mean_context_tokens:.0f} tokens")
        return Plan(feasible=False, reason=why, replicas=None, **common)

    b = mb.batch_size
    service_s = request_service_s(step_model, b, workload)
    capacity = replica_capacity_rps(step_model, b, workload)
    n_util = min_replicas_for_utilisation(workload.rate_rps, capacity, headroom)
    n_queue, queue_info = _queueing_first_guess(step_model, workload, slo, b, service_s, n_util)

    trace = workload.generate(num_requests, seed)
    replica = ReplicaConfig(step_model, b, kv_tokens, token_budget, block_size)
    results: dict[int, FleetSimResult] = {}

    def run(n: int) -> FleetSimResult:
        if n not in results:
            results[n] = simulate_fleet(trace, replica, n, policy)
        return results[n]

    cap_n = max_replicas if max_replicas is not None else max(64, 16 * n_queue)
    if cap_n < n_util:
        name = "replicas" if replicas is not None else "max_replicas"
        raise ValueError(f"{name}={cap_n}: below the {n_util} replicas needed to keep utilisation under "
                         f"{1 - headroom:g}; raise {name}")
    if replicas is not None:
        chosen = replicas if run(replicas).attainment(slo) >= attainment_target else None
    else:
        chosen = _smallest_meeting(lambda n: run(n).attainment(slo) >= attainment_target,
                                   min(max(n_queue, n_util), cap_n), n_util, cap_n)

    # The curve for the plot: a few sizes either side of the answer (or of the largest tried), plus all tried.
    centre = chosen if chosen is not None else max(results)
    for n in range(max(1, centre - 3), min(centre + 3, cap_n) + 1):
        run(n)
    curve = tuple(_point(n, results[n], slo, attainment_target, workload.rate_rps, capacity,
                         price.per_node_hour_usd) for n in sorted(results))
    final_n = chosen if chosen is not None else cap_n
    seeds = [seed + k for k in range(interval_seeds)]
    intervals = seed_intervals(lambda s: trace if s == seed else workload.generate(num_requests, s), replica,
                               final_n, policy, slo, seeds, {seed: results[final_n]})
    searched = dict(capacity_rps_per_replica=capacity, request_service_s=service_s, intervals=intervals,
                    min_replicas_for_utilisation=n_util, queueing=queue_info, curve=curve,
                    simulated_requests=num_requests, **common)
    if chosen is None and replicas is not None:
        # A fleet of the asked size, evaluated: it misses the target, but it is still the fleet to run and check.
        why = (f"attainment {results[replicas].attainment(slo):.3f} < target {attainment_target:g} with the "
               f"{replicas} replicas asked for")
        return Plan(feasible=False, reason=why, replicas=replicas,
                    **_outcome(replicas, results[replicas], slo, workload, capacity, price), **searched)
    if chosen is None:
        best = results[cap_n]
        zero_load = _zero_load_ttft_s(step_model, workload)
        why = (f"attainment {best.attainment(slo):.3f} < target {attainment_target:g} even at "
               f"max_replicas = {cap_n}; an unloaded replica's TTFT p99 is about {zero_load * 1000:.0f} ms "
               f"and its TPOT {step_model.decode_step_s(1) * 1000:.1f} ms, so the SLO may be out of reach "
               f"on this node at any fleet size")
        return Plan(feasible=False, reason=why, replicas=None,
                    **_outcome(cap_n, best, slo, workload, capacity, price), **searched)
    return Plan(feasible=True, reason=None, replicas=chosen,
                **_outcome(chosen, results[chosen], slo, workload, capacity, price), **searched)


def _check_fits(profile: Profile, workload: Workload, kv_tokens: int) -> None:
    """The longest request must fit the model's context and one replica's KV cache."""
    max_model_len = (profile.get("model") or {}).get("max_model_len")
    if isinstance(max_model_len, int) and workload.max_context_tokens > max_model_len:
        raise ValueError(f"workload: the longest request needs {workload.max_context_tokens} tokens "
                         f"(input + output) but model.max_model_len = {max_model_len}; shorten input_len/"
                         f"output_len or filter the trace")
    if workload.max_context_tokens > kv_tokens:
        raise ValueError(f"workload: the longest request needs {workload.max_context_tokens} tokens of KV but "
                         f"kv_cache.max_tokens = {kv_tokens} on one replica; shorten the lengths or profile "
                         f"with a larger KV cache")


def _smallest_meeting(meets: Callable[[int], bool], start: int, n_util: int, cap_n: int) -> int | None:
    """Smallest N in [n_util, cap_n] that meets the target, searching from `start`; None if even cap_n fails.

    Attainment grows with N on a fixed trace (more replicas never make a request later), so: if `start` meets,
    bisect down to the utilisation floor; else double until one meets, then bisect.
    """
    if meets(start):
        lo, hi = n_util - 1, start  # hi meets; lo is below the floor
    else:
        lo, hi = start, min(2 * start, cap_n)
        while not meets(hi) and hi < cap_n:
            lo, hi = hi, min(2 * hi, cap_n)
        if not meets(hi):
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def _queueing_first_guess(step_model: StepTimeModel, workload: Workload, slo: SLO, batch: int,
                          service_s: float, n_util: int) -> tuple[int, dict]:
    """Smallest N >= n_util whose M/M/(N*batch) TTFT p99 estimate meets the TTFT SLO.

    TTFT estimate = wait p99 (Erlang C tail) + the in-flight step a newcomer waits out + its own prefill step.
    Exponential service overstates the spread of real service times, so the wait is on the high side.
    """
    rate, mu = workload.rate_rps, 1.0 / service_s
    own_step_s = step_model.decode_step_s(batch)
    prefill_p99_s = step_model.prefill_s(workload.input_len.quantile(0.99))

    def estimate(n: int) -> tuple[float, float, float]:
        c = n * batch
        wait = mmc_wait_quantile_s(0.99, rate, mu, c)
        return wait + 2 * own_step_s + prefill_p99_s, wait, erlang_c(c, rate / mu)

    n = n_util
    ttft, wait, pw = estimate(n)
    if slo.ttft_s is not None:
        while ttft > slo.ttft_s and wait > 0.0:
            n += 1
            ttft, wait, pw = estimate(n)
    info = {"model": "M/M/c with c = replicas x max batch, mu = 1 / request_service_s",
            "first_guess_replicas": n, "probability_of_waiting": pw, "wait_p99_s": wait,
            "ttft_p99_estimate_s": ttft, "utilisation": rate / (n * batch * mu)}
    return n, info


def _zero_load_ttft_s(step_model: StepTimeModel, workload: Workload) -> float:
    return step_model.decode_step_s(1) + step_model.prefill_s(workload.input_len.quantile(0.99))


def _point(n: int, res: FleetSimResult, slo: SLO, target: float, rate: float, capacity: float,
           price_per_node_hour: float) -> PlanPoint:
    att = res.attainment(slo)
    return PlanPoint(n, att, res.percentiles_s("ttft")["p99"], res.percentiles_s("tpot")["p99"],
                     res.percentiles_s("e2e")["p99"], rate / (n * capacity), n * price_per_node_hour,
                     att >= target)


def _outcome(n: int, res: FleetSimResult, slo: SLO, workload: Workload, capacity: float, price: Price) -> dict:
    """What the simulated fleet of n replicas did and what it costs: the Plan's outcome fields."""
    cost_per_hour_usd = n * price.per_node_hour_usd
    # The fleet serves every request, so its bill spreads over the offered output tokens.
    output_tokens_per_hour = workload.rate_rps * workload.mean_output_tokens * 3600.0
    return dict(utilisation=workload.rate_rps / (n * capacity),
                latency_s={m: res.percentiles_s(m) for m in ("ttft", "tpot", "e2e")},
                attainment=res.attainment(slo), goodput_rps=res.goodput_rps(slo),
                goodput_output_tokens_per_s=res.goodput_output_tokens_per_s(slo),
                busy_fraction=res.busy_fraction(), slot_occupancy=res.slot_occupancy(),
                cost_per_hour_usd=cost_per_hour_usd, cost_per_month_usd=cost_per_hour_usd * HOURS_PER_MONTH,
                cost_per_million_output_tokens_usd=cost_per_hour_usd / output_tokens_per_hour * 1e6)


@dataclass(frozen=True)
class Comparison:
    """The cheapest fleet meeting the SLO for each profile, cheapest first; infeasible ones last."""

    plans: dict[str, Plan]

    def ranked(self) -> list[tuple[str, Plan]]:
        return sorted(self.plans.items(), key=lambda kv: (not kv[1].feasible, kv[1].cost_per_hour_usd or math.inf))

    def to_dict(self) -> dict:
        return {"ranked": [{"label": k, **p.to_dict()} for k, p in self.ranked()]}


def compare_plans(profiles: Mapping[str, Profile], workload: Workload, slo: SLO,
                  prices_per_node_hour: float | Mapping[str, float] | None = None,
                  instances: str | Mapping[str, str] | None = None, **plan_kwargs: Any) -> Comparison:
    """Plan each profile against the same workload and SLO. Prices and instances are one value for all or a
    {label: value} mapping; a label's own price wins over its instance's table price."""
    if not profiles:
        raise ValueError("profiles: give at least one {label: profile}")
    plans: dict[str, Plan] = {}
    for label, prof in profiles.items():
        price = prices_per_node_hour.get(label) if isinstance(prices_per_node_hour, Mapping) else prices_per_node_hour
        inst = instances.get(label) if isinstance(instances, Mapping) else instances
        if price is None and inst is None:
            raise ValueError(f"profile {label!r}: no price; give prices_per_node_hour[{label!r}] or "
                             f"instances[{label!r}]")
        plans[label] = plan(prof, workload, slo, price, instance=inst, **plan_kwargs)
    return Comparison(plans)
