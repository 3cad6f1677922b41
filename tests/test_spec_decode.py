"""Speculative decoding in the engine on tiny random models: greedy output token-for-token equal to the engine
without speculation (README prompts, 32 random prompts, both proposers), and prefix caching, preemption, chunked
prefill, stop strings, max_tokens, logprobs and n > 1 unchanged by it; rejected tokens never leave K/V behind."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pernode import LLM, SamplingParams
from pernode.cli import build_parser
from pernode.cli.options import engine_config_from_args
from pernode.config import EngineConfig, SpeculativeConfig
from pernode.serve.engine.block_pool import hash_block
from pernode.serve.engine.spec_decode.adaptive import (AcceptanceTracker, StepCostModel,
                                                       max_proposed_without_switching, plan_num_tokens)
from pernode.serve.engine.spec_decode.draft_vocab import DRAFT_VOCAB_FILE
from pernode.serve.engine.spec_decode.ngram_proposer import find_continuation
from pernode.serve.sampling.structured.spec import StructuredOutputs
from tiny_model import tiny_config, write_tiny_model

README_PROMPTS = ["The capital of France is", "def fib(n):", "Hi!"]
ENGINE = dict(num_blocks=192, max_model_len=384)


def random_prompts(count=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 48, (count,), generator=g).tolist()
    # a few repeated spans make some prompts input-grounded, where prompt lookup has something to find
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1000, 49152, (n,), generator=g).tolist()
        out.append(ids + ids[: n // 2] if i % 3 == 0 else ids)
    return out


def edit_weights(folder, change):
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    change(weights, torch.Generator().manual_seed(5))
    save_file(weights, path)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A random model that often, not always, repeats itself: the lm_head is the embedding plus noise. A tied
    random model only ever repeats its last token; an untied one never repeats: neither exercises rejections."""
    folder = write_tiny_model(str(tmp_path_factory.mktemp("spec") / "target"), tiny_config(tie_word_embeddings=False))
    edit_weights(folder, lambda w, g: w.__setitem__("lm_head.weight", w["model.embed_tokens.weight"]
                                                    + torch.randn(w["lm_head.weight"].shape, generator=g)))
    return folder


@pytest.fixture(scope="module")
def draft(tmp_path_factory, target):
    """The target with noise on every weight: a draft that agrees with it about half of the time."""
    folder = write_tiny_model(str(tmp_path_factory.mktemp("spec") / "draft"), tiny_config(tie_word_embeddings=False))
    shutil.copy(os.path.join(target, "model.safetensors"), os.path.join(folder, "model.safetensors"))
    edit_weights(folder, lambda w, g: [v.add_(0.3 * v.std() * torch.randn(v.shape, generator=g))
                                       for k, v in w.items() if "norm" not in k])
    return folder


SPECS = {"ngram": lambda draft: "ngram,k=4,adaptive=false",
         "draft": lambda draft: f"draft={draft},k=3,adaptive=false",
         "adaptive": lambda draft: "ngram,k=4"}


def greedy(n=24, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def baseline(target):
    llm = LLM(target, **ENGINE)
    return {"readme": ids(llm.generate(README_PROMPTS, greedy())),
            "random": ids(llm.generate(random_prompts(), greedy()))}


def registered_blocks_hold_kept_tokens(llm, sequences):
    """Every block in the prefix cache holds a block of some finished sequence's real tokens."""
    valid = set()
    for tokens in sequences:
        parent = llm.engine.kv.root_hash
        for i in range(len(tokens) // llm.engine.block_size):
            parent = hash_block(parent, tuple(tokens[i * llm.engine.block_size:(i + 1) * llm.engine.block_size]))
            valid.add(parent)
    return all(h in valid for h in llm.engine.kv.pool.cached)


@pytest.mark.parametrize("kind", list(SPECS))
def test_greedy_identical_readme_and_random_prompts(target, draft, baseline, kind):
    llm = LLM(target, speculative=SPECS[kind](draft), **ENGINE)
    readme = llm.generate(README_PROMPTS, greedy())
    assert ids(readme) == baseline["readme"]
    outs = llm.generate(random_prompts(), greedy())
    assert ids(outs) == baseline["random"]
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections were exercised too
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    llm.engine.kv.check_no_leak()
    assert registered_blocks_hold_kept_tokens(llm, [o.prompt_token_ids + o.outputs[0].token_ids
                                                    for o in readme + outs])


def test_rejected_tokens_leave_no_blocks_and_chunked_prefill_agrees(target, baseline):
    llm = LLM(target, speculative="ngram,k=4,adaptive=false", max_num_batched_tokens=7, **ENGINE)
    engine = llm.engine
    for i, p in enumerate(random_prompts()):
        engine.add_request(str(i), p, greedy())
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        for r in engine.scheduler.running:  # after a step: no proposed token keeps K/V or a block
            assert r.num_computed_tokens <= r.num_tokens
            assert len(r.block_ids) <= engine.kv.blocks_needed(r.num_tokens)
    assert [results[str(i)] for i in range(32)] == baseline["random"]
    engine.kv.check_no_leak()


def test_prefix_cache_hits_and_preemption_keep_outputs(target, draft, baseline):
    # 24 blocks of 16 tokens for 32 requests: preemption is certain
    llm = LLM(target, speculative=f"draft={draft},k=3,adaptive=false", num_blocks=24, max_model_len=384)
    prompts = random_prompts()
    assert ids(llm.generate(prompts, greedy())) == baseline["random"]
    assert llm.engine.stats().num_preemptions > 0
    assert ids(llm.generate(prompts, greedy())) == baseline["random"]  # again: prompts now from the cache
    assert llm.engine.stats().prefix_cache_hits > 0
    llm.engine.kv.check_no_leak()


def test_stop_strings_max_tokens_and_logprobs(target):
    plain, spec = LLM(target, **ENGINE), LLM(target, speculative="ngram,k=4,adaptive=false", **ENGINE)
    prompts = README_PROMPTS + [p for p in random_prompts(8, seed=3)]
    text = plain.generate(prompts[:1], greedy(30))[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string the greedy output certainly contains
    for params in (greedy(30, stop=[stop]), greedy(7, logprobs=3), greedy(13, min_tokens=5)):
        a, b = plain.generate(prompts, params), spec.generate(prompts, params)
        for x, y in zip(a, b):
            ox, oy = x.outputs[0], y.outputs[0]
            assert (ox.token_ids, ox.text, ox.finish_reason, ox.stop_reason) == \
                   (oy.token_ids, oy.text, oy.finish_reason, oy.stop_reason)
            assert len(oy.token_ids) <= params.max_tokens
            if params.logprobs:
                assert len(oy.logprobs) == len(oy.token_ids)
                for lx, ly in zip(ox.logprobs, oy.logprobs):
                    assert lx.token_id == ly.token_id and lx.logprob == pytest.approx(ly.logprob, abs=1e-4)
                    assert [t for t, _, _ in lx.top] == [t for t, _, _ in ly.top]
    assert spec.engine.stats().spec_decode.num_accepted_tokens > 0
    assert b[0].outputs[0].finish_reason is not None


def test_n_samples_greedy_and_seeded(target, draft, baseline):
    llm = LLM(target, speculative=f"draft={draft},k=3,adaptive=false", **ENGINE)
    out = llm.generate(README_PROMPTS[:1], SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert [o.token_ids for o in out.outputs] == [baseline["readme"][0]] * 3
    params = SamplingParams(n=3, temperature=30.0, top_k=50, seed=7, max_tokens=20, ignore_eos=True)
    first, again = llm.generate(["Hello"], params)[0], llm.generate(["Hello"], params)[0]
    assert all(len(o.token_ids) == 20 for o in first.outputs)
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1  # the samples differ
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]  # seeded: reproducible
    llm.engine.kv.check_no_leak()


def test_prompt_lookup_finds_latest_longest_match():
    import numpy as np
    seq = np.array([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7])
    assert find_continuation(seq, 1, 3, 3) == [9, 2, 6]  # "6 7" last seen before "9 2 6"
    assert find_continuation(np.array([1, 2, 3, 4]), 1, 3, 2) == []
    assert find_continuation(np.array([4, 4, 4]), 1, 2, 5) == [4]


def test_plan_follows_measured_costs():
    flat, linear, propose = StepCostModel(), StepCostModel(), StepCostModel()
    for n in (1, 2, 5, 32, 64):
        flat.record(n, 0.1)  # memory-bound: a step costs the same whatever its tokens
        linear.record(n, 0.001 * n)  # compute-bound: every token costs the same
    propose.record(1, 0.0)
    assert plan_num_tokens([0.8], 4, 0, flat, propose) == [4]
    assert plan_num_tokens([0.8] * 32, 4, 0, linear, propose) == [0] * 32
    # mixed acceptance: the well-predicted request gets more tokens than the poorly predicted one
    mixed = StepCostModel()
    for n in (2, 4, 8, 16):
        mixed.record(n, 0.05 + 0.01 * n)
    plan = plan_num_tokens([0.9, 0.2], 4, 0, mixed, propose)
    assert plan[0] > plan[1]
    tracker = AcceptanceTracker()
    for _ in range(10):
        tracker.record("a", 4, 4)
        tracker.record("b", 4, 0)
    assert tracker.rate("a") > 0.8 > 0.2 > tracker.rate("b")


def test_plan_prices_the_drafts_catch_up():
    verify, draft = StepCostModel(), StepCostModel()
    for n in (1, 2, 4, 8):
        verify.record(n, 0.1)  # memory-bound target: proposals are nearly free to verify
    for n in (1, 4, 64, 512):
        draft.record(n, 0.002 + 0.001 * n)  # the draft's forward grows with the tokens it reads
    assert plan_num_tokens([0.8], 4, 0, verify, draft, catch_up=[1.0]) == [4]  # in step: speculate
    # a draft 500 tokens behind costs more to catch up than the step can gain: decline
    assert plan_num_tokens([0.8], 4, 0, verify, draft, catch_up=[500.0]) == [0]
    # of two requests the one whose draft is up to date proposes, the one far behind does not
    assert plan_num_tokens([0.8, 0.8], 4, 0, verify, draft, catch_up=[1.0, 500.0]) == [4, 0]


def test_proposals_never_cross_a_kernel_switch():
    assert max_proposed_without_switching(3, [9, 15]) == 5  # up to 8 rows: the GEMV, as at 3
    assert max_proposed_without_switching(9, [9, 15]) == 5  # already on the GEMM at 9: up to 14
    assert max_proposed_without_switching(20, [9, 15]) >= 1 << 20  # past every switch
    verify, propose = StepCostModel(), StepCostModel()
    verify.record(1, 0.1)
    propose.record(1, 0.0)
    assert sum(plan_num_tokens([0.9] * 3, 4, 0, verify, propose, max_total=5)) == 5


def test_options_validate_and_parse(target, tmp_path):
    assert SpeculativeConfig.parse("draft=/m,k=5").to_dict()["draft_model"] == "/m"
    assert EngineConfig(speculative="ngram,k=2,ngram_max=5").speculative.ngram_max == 5
    for bad, field in [("ngram,k=0", "speculative.k"), ("ngram,k=99", "speculative.k"), ("draft,k=2", "draft_model"),
                       ("ngram,window=3", "not understood"), ("k=3", "names no proposer"),
                       ("ngram,ngram_min=4,ngram_max=2", "speculative.ngram_max")]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(speculative=bad)
    with pytest.raises(ValueError, match="unknown speculative settings"):
        EngineConfig.from_dict({"speculative": {"method": "ngram", "depth": 3}})
    other = write_tiny_model(str(tmp_path / "other"), tiny_config(vocab_size=512))
    with pytest.raises(ValueError, match="speculative.draft_model=.*vocab_size=512"):
        LLM(target, speculative=f"draft={other}", **ENGINE)
    for command in (["generate", "x"], ["serve"], ["profile"]):
        args = build_parser().parse_args(command + ["--speculative", "ngram,k=3"])
        assert engine_config_from_args(args).speculative.k == 3


def test_constrained_and_biased_requests_beside_speculating_ones(target):
    """Verification draws from the sampler's distribution without grammar masks, logit_bias or allowed_token_ids,
    so requests with those take one exact token per step while the rest of the batch speculates: every output
    equals the engine's without speculation, and the constrained one follows its regex."""
    prompts = README_PROMPTS + random_prompts(count=6, seed=3)
    params = [greedy(), greedy(structured_outputs=StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}")),
              greedy(logit_bias={1000: 5.0, 1001: -100.0}), greedy(allowed_token_ids=list(range(1000, 1064)))]
    params += [greedy()] * (len(prompts) - len(params))
    plain = ids(LLM(target, **ENGINE).generate(prompts, params))
    llm = LLM(target, speculative="ngram,k=4,adaptive=false", **ENGINE)
    outs = llm.generate(prompts, params)
    assert ids(outs) == plain
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].outputs[0].text)
    assert all(1000 <= t < 1064 for t in outs[3].outputs[0].token_ids)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0  # the unconstrained ones did speculate
    llm.engine.kv.check_no_leak()


# --- reduced-vocabulary draft head (FR-Spec) and the draft's share of the KV budget ---------------------------

def reduced_draft(folder, source, token_ids):
    shutil.copytree(source, folder)
    with open(os.path.join(folder, DRAFT_VOCAB_FILE), "w", encoding="utf-8") as f:
        json.dump({"token_ids": token_ids}, f)
    return folder


def test_greedy_identical_with_a_reduced_head(target, draft, tmp_path):
    prompts = README_PROMPTS + random_prompts(8, seed=3)
    baseline = ids(LLM(target, **ENGINE).generate(prompts, greedy()))
    produced = sorted({t for seq in baseline for t in seq})
    # most of what the target says, and some tokens it never says; a fifth of its tokens the draft cannot propose
    subset = sorted(set(produced[::5] + produced[1::5] + produced[2::5] + produced[3::5]) | set(range(100, 600)))
    folder = reduced_draft(str(tmp_path / "reduced"), draft, subset)
    llm = LLM(target, speculative=f"draft={folder},k=3,adaptive=false", **ENGINE)
    proposer = llm.engine.speculator.proposer
    assert proposer.model.lm_head.weight.shape[0] == len(subset)
    proposed = []
    original = proposer.propose

    def recording(requests, num_tokens):
        out = original(requests, num_tokens)
        proposed.extend(t for p in out for t in p.token_ids)
        return out

    proposer.propose = recording
    assert ids(llm.generate(prompts, greedy())) == baseline
    stats = llm.engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert proposed and set(proposed) <= set(subset)


def test_draft_kv_is_paid_out_of_kv_cache_bytes(target, draft):
    budget = 3 * 2**20
    plain = LLM(target, kv_cache_bytes=budget, max_model_len=384).engine
    spec = LLM(target, speculative=f"draft={draft},k=3", kv_cache_bytes=budget, max_model_len=384).engine
    per_token = plain.kv_bytes_per_token
    # same shapes; the draft's cache in its compute dtype, the target's in its KV cache dtype
    draft_per_token = spec.speculator.proposer.config.kv_bytes_per_token(spec.dtype.itemsize)
    assert plain.draft_kv_bytes_per_token == 0 and spec.draft_kv_bytes_per_token == draft_per_token
    assert plain.num_blocks == budget // (plain.block_size * per_token)
    assert spec.num_blocks == budget // (spec.block_size * (per_token + draft_per_token))
    allocated = sum(t.numel() * t.element_size() for pair in spec.runner.kv_caches for t in pair)
    allocated += sum(t.numel() * t.element_size() for pair in spec.speculator.proposer.kv_caches for t in pair)
    assert allocated == spec.kv_cache_bytes <= budget


def test_plan_prices_an_eagle_head_request_by_request():
    verify, head = StepCostModel(), StepCostModel()
    for n in (1, 2, 4, 8, 16, 32, 64, 96, 128):
        verify.record(n, 0.010 + 0.0001 * n)  # a batch's step: mostly its weights, a little per token
    for n in (1, 2, 4):
        head.record(n, 0.002)  # one head call costs its fixed 2 ms whatever it reads
    # batch 1: one 2 ms call per proposed token is worth it at this acceptance
    assert plan_num_tokens([0.9], 4, 0, verify, head, catch_up=[1.0], per_request=True)[0] > 0
    # 32 requests: 32 calls of 2 ms per depth cost more than the verified tokens gain; priced as one batched
    # forward (a draft model's rule) the same head would look nearly free
    assert plan_num_tokens([0.5] * 32, 4, 0, verify, head, catch_up=[1.0] * 32, per_request=True) == [0] * 32
    assert sum(plan_num_tokens([0.5] * 32, 4, 0, verify, head, catch_up=[1.0] * 32)) > 0
