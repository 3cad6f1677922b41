"""How many tokens each request proposes this step, from measured costs and measured acceptance.

A request whose proposals are accepted at rate a yields, with k proposed, 1 + a + a^2 + ... + a^k tokens per step
in expectation (Leviathan et al., arXiv 2211.17192, eq. 1). The step costs what the engine measured for steps of
that many tokens, plus what the proposer measured for proposing that many. The plan maximises tokens per second
over the whole batch: the j-th proposed token of a request adds a^j expected tokens, so the best plan with m
proposed tokens takes the m largest a_i^j; every m is priced and the fastest kept. m = 0 (no speculation) wins by
itself once the batch is large enough that the extra verified tokens cost more than they yield.
"""
from __future__ import annotations


class StepCostModel:
    """Seconds of a step as a function of its token count: the recent mean where that count was measured, a
    weighted least-squares line (recent steps weigh more) in between. Until two counts were seen, the line is flat:
    the optimistic guess that lets speculation run once and be measured."""

    def __init__(self, decay: float = 0.98, mean_weight: float = 0.3):
        self.decay = decay
        self.mean_weight = mean_weight
        self.mean_s: dict[int, float] = {}
        self.s0 = self.s1 = self.s2 = self.t0 = self.t1 = 0.0

    def record(self, num_tokens: int, seconds: float) -> None:
        old = self.mean_s.get(num_tokens)
        self.mean_s[num_tokens] = seconds if old is None else old + self.mean_weight * (seconds - old)
        d = self.decay
        self.s0 = d * self.s0 + 1
        self.s1 = d * self.s1 + num_tokens
        self.s2 = d * self.s2 + num_tokens * num_tokens
        self.t0 = d * self.t0 + seconds
        self.t1 = d * self.t1 + num_tokens * seconds

    def line(self) -> tuple[float, float]:
        """(seconds at 0 tokens, seconds per token), both >= 0."""
        if self.s0 == 0:
            return 0.0, 0.0
        var = self.s0 * self.s2 - self.s1 * self.s1
        slope = (self.s0 * self.t1 - self.s1 * self.t0) / var if var > 1e-9 * self.s0 * self.s0 else 0.0
        slope = max(slope, 0.0)
        return max((self.t0 - slope * self.s1) / self.s0, 0.0), slope

    def predict(self, num_tokens: int) -> float:
        return self.predictor()(num_tokens)

    def predictor(self):
        """`predict` with the line fitted once: a plan prices hundreds of token counts per step."""
        mean_s, (intercept, slope) = self.mean_s, self.line()
        return lambda num_tokens: mean_s.get(num_tokens, intercept + slope * num_tokens)


class AcceptanceTracker:
    """Per-request acceptance rate: a recent-weighted ratio of accepted proposals to proposals judged (the first
    rejection ends a step's judging). A new request starts from the engine-wide rate."""

    def __init__(self, prior: float = 0.5, decay: float = 0.8):
        self.decay = decay
        self.global_rate = prior
        self.per_request: dict[str, tuple[float, float]] = {}  # id -> (weighted accepted, weighted judged)

    def rate(self, request_id: str) -> float:
        accepted, judged = self.per_request.get(request_id, (0.0, 0.0))
        # one pseudo-observation at the engine-wide rate keeps a new request's estimate from swinging to 0 or 1
        return (accepted + self.global_rate) / (judged + 1.0)

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        if num_proposed == 0:
            return
        judged = num_accepted + (1 if num_accepted < num_proposed else 0)
        a, j = self.per_request.get(request_id, (0.0, 0.0))
        self.per_request[request_id] = (self.decay * a + num_accepted, self.decay * j + judged)
        self.global_rate += 0.05 * (num_accepted / judged - self.global_rate)

    def forget(self, request_id: str) -> None:
        self.per_request.pop(request_id, None)


def max_proposed_without_switching(num_rows: int, switch_rows: list[int]) -> int:
    """The most rows that can join a step of `num_rows` rows without reaching a row count where a layer changes
    kernel (`switch_rows`, LlamaForCausalLM.kernel_switch_rows): below it, every row is computed as in the step
    without them, bit for bit."""
    above = [r for r in switch_rows if r > num_rows]
    return min(above) - num_rows - 1 if above else 1 << 30


def plan_num_tokens(rates: list[float], k_max: int, num_other_tokens: int, verify: StepCostModel,
                    propose: StepCostModel, max_total: int = 1 << 30,
                    catch_up: list[float] | None = None, per_request: bool = False) -> list[int]:
    """Tokens to propose per request (0..k_max, at most `max_total` in all) maximising expected tokens per second
    of the step.

    `rates`: acceptance rate of each decoding request; `num_other_tokens`: tokens of the step that are not these
    requests' (prefill chunks), which cost time and yield no decode tokens. Without `catch_up`, `propose` prices a
    proposer call by the tokens it proposes (prompt lookup). With it (a draft model), `propose` prices one draft
    forward by its token count, and `catch_up[i]` is what request i's first forward must read before it proposes
    (the tokens the target accepted since, or its whole prompt the first time): a plan costs that first forward
    over every proposing request, then one forward per further depth over the requests proposing that deep.
    `per_request` (an EAGLE head, which runs request after request): `propose` prices one head call by the pairs
    it reads, and a plan costs, for each proposing request, a first call over its catch-up and one call of one pair
    per further token."""
    base_tokens = len(rates) + num_other_tokens
    best_m, best_rate = 0, len(rates) / max(verify.predict(base_tokens), 1e-9)
    best_gains: list[tuple[float, float, int]] = []
    # Tokens join the plan by expected gain (ties: the draft least behind first). A draft far behind costs its
    # catch-up however little it then proposes, so the plan among the requests whose drafts are in step is priced too.
    lag = catch_up or [0.0] * len(rates)
    candidates = [range(len(rates))]
    if catch_up is not None:
        candidates.append([i for i in range(len(rates)) if lag[i] <= k_max + 1])
    step_s, propose_s = verify.predictor(), propose.predictor()
    for requests in candidates:
        gains = sorted(((rates[i] ** j, -lag[i], i) for i in requests for j in range(1, k_max + 1)
                        if rates[i] > 0), reverse=True)[:max_total]
        m, rate = _best_prefix(gains, len(rates), k_max, base_tokens, step_s, propose_s, catch_up, per_request)
        if rate > best_rate:
            best_m, best_rate, best_gains = m, rate, gains
    plan = [0] * len(rates)
    for _, _, i in best_gains[:best_m]:
        plan[i] += 1
    return plan


def _best_prefix(gains: list[tuple[float, float, int]], num_requests: int, k_max: int, base_tokens: int,
                 step_s, propose_s, catch_up: list[float] | None, per_request: bool = False) -> tuple[int, float]:
    """(m, expected tokens per second) of the fastest plan made of the first m of `gains`, m >= 1; `step_s` and
    `propose_s` price a step and a proposer call (or draft forward) by token count."""
    best_m, best_rate = 0, 0.0
    expected = float(num_requests)
    planned = [0] * num_requests
    deeper = [0] * (k_max + 1)  # deeper[d]: requests proposing at least d tokens
    first_forward = 0.0
    later_forwards_s = 0.0  # the draft forwards at depth 2 and on, kept up to date as `deeper` grows
    proposing = 0.0  # seconds of proposing the first m tokens
    for m, (gain, _, i) in enumerate(gains, start=1):
        expected += gain
        planned[i] += 1
        d = planned[i]
        deeper[d] += 1
        if catch_up is None:
            proposing = propose_s(m)
        elif per_request:  # one more head call: the request's first (over its catch-up) or one chained pair
            proposing += propose_s(max(1, round(catch_up[i])) if d == 1 else 1)
        else:
            if d == 1:
                first_forward += catch_up[i]
            else:
                later_forwards_s += propose_s(deeper[d]) - (propose_s(deeper[d] - 1) if deeper[d] > 1 else 0.0)
            proposing = propose_s(round(first_forward)) + later_forwards_s
        rate = expected / max(step_s(base_tokens + m) + proposing, 1e-9)
        if rate > best_rate:
            best_m, best_rate = m, rate
    return best_m, best_rate
