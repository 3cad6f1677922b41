"""Does a draft model pay at batch 1? For each draft (NAME=PATH: a draft model folder, or an EAGLE head folder,
recognised by its head.json) on the chat workload, in one run:

- acceptance rate and mean accepted length at a fixed k (greedy, so they do not depend on the machine's load);
- interleaved prompt by prompt (the engines' order rotates), the batch-1 TPOT of the target without speculation
  and with each draft, each draft's measured seconds per proposed token and the target's verify step;
- the speed-up predicted from them: mean accepted length L tokens per step that costs k draft steps and one
  verify step of k + 1 tokens, against one plain decode step per token:
      predicted = L * t_plain / (k * t_draft + t_verify)       (Leviathan et al., arXiv 2211.17192, sec. 3.4)
  beside the speed-up measured directly (TPOT without / with);
- at these measured costs, the speed-up if the target accepted every proposed token, and the per-token acceptance
  a draft would need for --target (default 1.3x), with L = (1 - a^(k+1)) / (1 - a) (the paper's eq. 1).

    PYTHONPATH=src .venv/bin/python benchmarks/draft_payoff.py --drafts new=/work/artifacts/draft \
        --num-prompts 8 --max-tokens 64 --k 1,2,3,4

Several k values (--k 1,2,3,4) give one engine per (draft, k), all interleaved with the plain one in the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/draft_payoff.py --drafts eagle=/work/artifacts/eagle_head \
        --num-prompts 8 --max-tokens 64 --k 1,2,3,4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from pernode.config import DEFAULT_MODEL, EngineConfig, SpeculativeConfig
from pernode.jobs.speculative import chat_prompts
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.spec_decode.eagle_head import HEAD_CONFIG
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams


def expected_length(acceptance: float, k: int) -> float:
    """Tokens a step yields when each proposed token is accepted with this probability, independently, up to the
    first rejection, plus the verify step's own token (Leviathan et al., eq. 1): (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def acceptance_needed(speedup: float, k: int, draft_cost: float, verify_cost: float) -> float | None:
    """The per-token acceptance at which k draft steps and one verify step (each as a multiple of a plain decode
    step) give this speed-up; None where even a draft the target always accepts falls short."""
    step_cost = k * draft_cost + verify_cost
    if expected_length(1.0, k) / step_cost < speedup:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the length grows with the acceptance: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_length(mid, k) / step_cost < speedup else (lo, mid)
    return hi


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


@dataclasses.dataclass
class Timings:
    decode_s: float = 0.0  # first token to last token, summed over requests
    decode_tokens: int = 0  # tokens after the first
    propose_s: float = 0.0
    propose_calls: int = 0
    propose_tokens: int = 0
    verify_s: float = 0.0
    verify_steps: int = 0


def instrument(engine: LLMEngine, t: Timings) -> None:
    """Time the proposer's calls (not those that also prefilled the draft) and the verifying steps."""
    spec = engine.speculator
    propose, record_step = spec.proposer.propose, spec.record_step

    def timed_propose(requests, num_tokens):
        # a call that also prefills the draft (far more tokens to read than k + 1) says little of the next one
        k = max(num_tokens)
        if hasattr(spec.proposer, "_done"):  # a draft model
            caught_up = any(r.num_tokens - spec.proposer._done(r) > k + 2 for r in requests)
        else:  # an EAGLE head: pairs it has not read yet
            caught_up = any(spec.proposer.catch_up_tokens(r, k) > k + 2 for r in requests)
        started = time.perf_counter()
        out = propose(requests, num_tokens)
        if not caught_up:
            t.propose_s += time.perf_counter() - started
            t.propose_calls += 1
            t.propose_tokens += sum(num_tokens)
        return out

    def timed_step(num_tokens, seconds):
        if num_tokens > 1:
            t.verify_s += seconds
            t.verify_steps += 1
        record_step(num_tokens, seconds)

    spec.proposer.propose = timed_propose
    spec.record_step = timed_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--drafts", required=True, help="NAME=PATH,... draft model folders or EAGLE head folders")
    p.add_argument("--k", default="4", help="proposal length(s), comma-separated: one engine per draft and k")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=1.3,
                   help="speed-up for which to print the acceptance a draft at these measured costs would need")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = EngineConfig(model=args.model, max_model_len=2048, kv_cache_bytes=128 * 2**20)  # many engines
    ks = [int(k) for k in str(args.k).split(",")]
    paths = dict(item.split("=", 1) for item in args.drafts.split(","))
    drafts = {(f"{name}@k{k}" if len(ks) > 1 else name): (path, k) for name, path in paths.items() for k in ks}
    engines = {"off": LLMEngine(config)}
    timings = {name: Timings() for name in ["off", *drafts]}
    for name, (path, k) in drafts.items():
        method = "eagle" if os.path.isfile(os.path.join(path, HEAD_CONFIG)) else "draft"
        spec = SpeculativeConfig(method, k=k, draft_model=path, adaptive=False)
        engines[name] = LLMEngine(dataclasses.replace(config, speculative=spec))
        instrument(engines[name], timings[name])
    llms = {name: LLM.from_engine(e) for name, e in engines.items()}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in llms.values():
        llm.chat(chat_prompts(1), SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    before = {n: e.stats().spec_decode for n, e in engines.items()}
    load_before = load_average()
    print(f"load average before: {load_before}", flush=True)
    names = list(llms)
    outputs: dict[str, list[list[int]]] = {n: [] for n in names}
    for i, conv in enumerate(chat_prompts(args.num_prompts)):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            out = llms[name].chat([conv], params)[0]
            m, n = out.metrics, len(out.outputs[0].token_ids)
            outputs[name].append(list(out.outputs[0].token_ids))
            if m and m.first_token_s is not None and m.finished_s is not None and n > 1:
                timings[name].decode_s += m.finished_s - m.first_token_s
                timings[name].decode_tokens += n - 1
    load_after = load_average()
    print(f"load average after: {load_after}", flush=True)
    plain = timings["off"].decode_s / max(timings["off"].decode_tokens, 1)
    rows = []
    for name in drafts:
        t, s0, s1 = timings[name], before[name], engines[name].stats().spec_decode
        drafted, accepted = s1.num_draft_tokens - s0.num_draft_tokens, s1.num_accepted_tokens - s0.num_accepted_tokens
        num = s1.num_drafts - s0.num_drafts
        length = 1 + accepted / num if num else 1.0
        draft_token_s = t.propose_s / max(t.propose_tokens, 1)
        verify_s = t.verify_s / max(t.verify_steps, 1)
        per_step = t.propose_s / max(t.propose_calls, 1) + verify_s
        tpot = t.decode_s / max(t.decode_tokens, 1)
        rows.append({"draft": name, "path": drafts[name][0], "k": drafts[name][1],
                     "acceptance_rate": round(accepted / max(drafted, 1), 4),
                     "mean_accepted_length": round(length, 3), "plain_tpot_ms": round(1e3 * plain, 2),
                     "draft_ms_per_token": round(1e3 * draft_token_s, 2), "verify_step_ms": round(1e3 * verify_s, 2),
                     "draft_to_target_cost": round(draft_token_s / plain, 3),
                     "verify_to_target_cost": round(verify_s / plain, 3),
                     "predicted_speedup": round(length * plain / per_step, 3),
                     "speedup_if_all_accepted": round(expected_length(1.0, drafts[name][1]) * plain / per_step, 3),
                     "acceptance_needed": acceptance_needed(args.target, drafts[name][1], draft_token_s / plain,
                                                            verify_s / plain),
                     "spec_tpot_ms": round(1e3 * tpot, 2), "measured_speedup": round(plain / tpot, 3),
                     "greedy_identical": outputs[name] == outputs["off"]})
    print(f"{'draft':14s} {'accept':>6s} {'len':>5s} {'draft/target':>12s} {'verify/target':>13s} "
          f"{'predicted':>9s} {'measured':>8s} {'all accepted':>12s} {'needs for ' + str(args.target) + 'x':>14s}")
    for r in rows:
        needed = "unreachable" if r["acceptance_needed"] is None else f"{r['acceptance_needed']:.3f}"
        print(f"{r['draft']:14s} {r['acceptance_rate']:6.3f} {r['mean_accepted_length']:5.2f} "
              f"{r['draft_to_target_cost']:12.3f} {r['verify_to_target_cost']:13.3f} {r['predicted_speedup']:8.2f}x "
              f"{r['measured_speedup']:7.2f}x {r['speedup_if_all_accepted']:11.2f}x {needed:>14s}"
              + ("" if r["greedy_identical"] else "  OUTPUT DIFFERS"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                       "load_before": load_before, "load_after": load_after}, f, indent=1)
    return 0 if all(r["greedy_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
