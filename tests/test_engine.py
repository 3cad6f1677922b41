"""Engine invariants on a tiny random model: batching, chunking, prefix caching and preemption never change
what a request generates, and every block comes back."""
import json
import re

import pytest
import torch

from pernode import LLM, SamplingParams
from pernode.cli import build_parser, command_flags, with_flags
from pernode.cli.options import engine_config_from_args
from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.outputs import FinishReason
from pernode.serve.engine.request import Request
from pernode.serve.engine.stop_checker import check_stop
from tiny_model import write_tiny_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books about the sea.",
    "1, 2, 3, 4,",
    "Ünïcödé tëxt and emoji 🙂 mixed with CJK 你好世界 and more words to make this prompt longer than the others "
    "by quite a margin so it spans several KV blocks of sixteen tokens each.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"))


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    return [token_ids(llm.generate([p], greedy(24)))[0] for p in PROMPTS]


def test_batched_greedy_equals_each_request_alone(tiny_dir, alone):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    assert token_ids(llm.generate(PROMPTS, greedy(24))) == alone
    llm.engine.kv.check_no_leak()


@pytest.mark.parametrize("budget", [5, 16, 37])
def test_chunked_prefill_matches_one_shot(tiny_dir, alone, budget):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params)
    assert token_ids(outs) == alone
    ref = LLM(tiny_dir, num_blocks=256, max_model_len=512, max_num_batched_tokens=4096).generate(PROMPTS, params)
    for a, b in zip(outs, ref):
        got = torch.tensor([lp.logprob for lp in a.outputs[0].logprobs])
        want = torch.tensor([lp.logprob for lp in b.outputs[0].logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prefix_cache_hit_gives_same_output_and_computes_less(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    shared = PROMPTS[4] * 2
    first = llm.generate([shared], greedy(16))[0]
    before = llm.engine.stats()
    second = llm.generate([shared], greedy(16))[0]
    after = llm.engine.stats()
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= len(first.prompt_token_ids) - 16
    assert after.prefix_cache_hits - before.prefix_cache_hits == second.num_cached_tokens
    no_cache = LLM(tiny_dir, num_blocks=256, max_model_len=512, enable_prefix_caching=False)
    assert no_cache.generate([shared], greedy(16))[0].outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_under_a_small_cache_keeps_outputs(tiny_dir, alone):
    # 5 prompts of up to ~60 tokens + 24 outputs cannot all fit in 12 blocks of 16 tokens at once
    llm = LLM(tiny_dir, num_blocks=12, max_model_len=512)
    outs = llm.generate(PROMPTS, greedy(24))
    assert token_ids(outs) == alone
    assert llm.engine.stats().num_preemptions > 0
    llm.engine.kv.check_no_leak()


def test_request_that_cannot_fit_alone_gets_clear_error_others_finish(tiny_dir, alone):
    llm = LLM(tiny_dir, num_blocks=4, max_model_len=512)  # 64 tokens of KV in all
    outs = llm.generate([PROMPTS[0], PROMPTS[4]], greedy(24))
    assert outs[0].error is None and outs[0].outputs[0].token_ids == alone[0]
    assert "KV blocks" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    llm.engine.kv.check_no_leak()


def test_prompt_plus_max_tokens_beyond_max_model_len_fails_that_request_only(tiny_dir, alone):
    llm = LLM(tiny_dir, num_blocks=64, max_model_len=40)
    outs = llm.generate([PROMPTS[0], PROMPTS[3]], [greedy(24), greedy(39)])
    assert outs[0].outputs[0].token_ids == alone[0]
    assert "max_model_len (40)" in outs[1].error and "max_tokens" in outs[1].error


def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    params = SamplingParams(temperature=5.0, top_p=0.99, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(PROMPTS, [others, params, others, others, others])[1].outputs[0].token_ids
    assert batched == alone
    different_seed = SamplingParams(temperature=5.0, top_p=0.99, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[1]], different_seed)[0].outputs[0].token_ids != alone


def test_n_samples_share_the_prompt_blocks(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    params = SamplingParams(n=3, temperature=5.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate([PROMPTS[4]], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds per sample
    prompt_len = len(out.prompt_token_ids)
    full_blocks = (prompt_len - 1) // 16
    assert llm.engine.stats().prefix_cache_hits >= 2 * full_blocks * 16
    llm.engine.kv.check_no_leak()


def test_stop_strings_stop_tokens_min_tokens_and_lengths(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    base = llm.generate([PROMPTS[0]], greedy(24))[0].outputs[0]
    text = base.text
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)] and stop not in out.text
    # a stop token id ends generation at its first occurrence, after min_tokens
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and len(out.token_ids) == first + 1
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok],
                                                    min_tokens=first + 2))[0].outputs[0]
    assert len(out.token_ids) >= first + 2


def test_logprobs_report_sampled_token_and_top_alternatives(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=5))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 5
        assert lp.top[0][0] == tok  # greedy: the sampled token is the best one
        assert lp.logprob == pytest.approx(lp.top[0][2])
        assert all(a[2] >= b[2] for a, b in zip(lp.top, lp.top[1:]))
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))


def test_penalties_change_greedy_output(tiny_dir):
    llm = LLM(tiny_dir, num_blocks=256, max_model_len=512)
    plain = llm.generate([PROMPTS[3]], greedy(24))[0].outputs[0].token_ids
    penalised = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                          frequency_penalty=2.0, presence_penalty=2.0))
    ids = penalised[0].outputs[0].token_ids
    assert ids != plain
    assert len(set(ids)) >= len(set(plain))


def test_abort_frees_blocks_at_once_and_reports_abort(tiny_dir):
    engine = LLMEngine(model=tiny_dir, num_blocks=256, max_model_len=512)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, greedy(50))
    engine.step()
    engine.step()
    assert engine.stats().num_running > 0
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    engine.kv.check_no_leak()
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == [f"r{i}" for i in range(len(PROMPTS))]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished_requests()


def test_failing_step_fails_its_requests_and_engine_goes_on(tiny_dir, alone, monkeypatch):
    engine = LLMEngine(model=tiny_dir, num_blocks=256, max_model_len=512)
    engine.add_request("bad", PROMPTS[0], greedy(4))
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = engine.step()
    assert outs[0].error == "RuntimeError: boom" and outs[0].outputs[0].finish_reason == "error"
    engine.kv.check_no_leak()
    monkeypatch.setattr(engine.runner, "execute", real)
    engine.add_request("good", PROMPTS[0], greedy(24))
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert done[0].outputs[0].token_ids == alone[0]


def test_streaming_deltas_concatenate_to_the_final_text(tiny_dir):
    engine = LLMEngine(model=tiny_dir, num_blocks=256, max_model_len=512)
    engine.add_request("s", PROMPTS[4], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["zzzz"]))
    deltas, ids, final = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            ids += out.outputs[0].delta_token_ids
            final = out
    assert "".join(deltas) == final.outputs[0].text
    assert ids == final.outputs[0].token_ids and len(ids) == 30
    assert final.outputs[0].text == engine.tokenizer.decode(ids)


def test_bad_prompts_raise_clear_errors(tiny_dir):
    engine = LLMEngine(model=tiny_dir, num_blocks=64, max_model_len=128)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", "", greedy(4))
    with pytest.raises(ValueError, match=r"token id 49152 is out of range"):
        engine.add_request("b", [1, 49152], greedy(4))
    with pytest.raises(ValueError, match=r"token id -1"):
        engine.add_request("c", [-1], greedy(4))
    engine.add_request("d", "ok", greedy(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("d", "ok", greedy(4))


# ---- settings, stop rules and finish reasons, without a model ----------------------------------------------------
@pytest.mark.parametrize("setting,value,allowed", [
    ("max_num_seqs", 0, ">= 1"), ("max_num_batched_tokens", -5, ">= 1"), ("block_size", 0, "1..256"),
    ("block_size", 300, "1..256"), ("num_blocks", 0, ">= 1"), ("kv_cache_bytes", 0, ">= 1"),
    ("max_model_len", 1, ">= 2"), ("num_threads", 0, ">= 1"), ("max_num_seqs", True, ">= 1"),
])
def test_engine_config_rejects_out_of_range_settings_by_name(setting, value, allowed):
    with pytest.raises(ValueError, match=rf"^{setting}={value!r} is out of range: allowed .*{re.escape(allowed)}"):
        EngineConfig(**{setting: value})


def test_engine_rejects_bad_settings_before_loading_and_cli_names_the_flag():
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        LLMEngine(model="/nonexistent/model", max_num_seqs=0)  # the setting, not the missing model, is reported
    with pytest.raises(ValueError, match="dtype='int3'"):
        EngineConfig(dtype="int3")
    message = str(pytest.raises(ValueError, EngineConfig, max_num_seqs=0).value)
    assert with_flags(message, command_flags("generate")).startswith("--max-num-seqs 0 is out of range")


def test_engine_config_round_trips_through_a_dict():
    config = EngineConfig(model="m", device="cpu", num_blocks=8, max_num_seqs=4, enable_prefix_caching=False)
    assert EngineConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineConfig.from_dict({**config.to_dict(), "max_num_sequences": 4})


def test_finish_reason_compares_and_serialises_as_its_string():
    assert FinishReason.STOP == "stop" and f"{FinishReason.LENGTH}" == "length"
    assert json.dumps({"finish_reason": FinishReason.ABORT}) == '{"finish_reason": "abort"}'


def test_check_stop_token_rules_win_over_length_and_wait_for_min_tokens():
    eos = 2

    def after(tokens, **params):
        request = Request("r", [5, 6, 7], SamplingParams(**params), [eos])
        for t in tokens:
            request.append_token(t)
        return check_stop(request, max_model_len=8), request.stop_reason

    assert after([9]) == (None, None)
    assert after([eos]) == (FinishReason.STOP, None)
    assert after([eos], min_tokens=2) == (None, None)
    assert after([9, 4], stop_token_ids=[4]) == (FinishReason.STOP, 4)
    assert after([9, 4], stop_token_ids=[4], max_tokens=2) == (FinishReason.STOP, 4)
    assert after([9, 9], max_tokens=2) == (FinishReason.LENGTH, None)
    assert after([9] * 5, max_tokens=None) == (FinishReason.LENGTH, None)  # 3 + 5 tokens fill max_model_len
    assert after([eos], ignore_eos=True) == (None, None)


def test_prefix_cache_salt_keys_the_cache_and_rejects_a_non_string(tiny_dir):
    salted = LLM(tiny_dir, num_blocks=64, max_model_len=256, prefix_cache_salt="tenant-a")
    plain = LLM(tiny_dir, num_blocks=64, max_model_len=256)
    prompt = PROMPTS[4]
    outs = [llm.generate([prompt], greedy(4)) + llm.generate([prompt], greedy(4)) for llm in (salted, plain)]
    assert token_ids(outs[0]) == token_ids(outs[1])  # the salt changes keys, never outputs
    assert salted.engine.kv.root_hash != plain.engine.kv.root_hash
    stats = salted.engine.stats()  # two admissions, the second served from the first's blocks
    assert stats.prefix_cache_queries == 2 * len(outs[0][0].prompt_token_ids)
    assert stats.prefix_cache_hits == outs[0][1].num_cached_tokens > 0
    with pytest.raises(ValueError, match=r"prefix_cache_salt=5 is not supported: allowed a string"):
        EngineConfig(prefix_cache_salt=5)
    args = build_parser().parse_args(["serve", "--prefix-cache-salt", "tenant-a"])  # one salt per server
    assert engine_config_from_args(args).prefix_cache_salt == "tenant-a"
