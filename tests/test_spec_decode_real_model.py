"""Speculative decoding on the default model (SmolLM2-135M GGUF, native Q4_1 weights, at the default dtype: bf16 where
the CPU computes it natively, else fp32): greedy outputs are token-for-token those without speculation on the README
prompts, a copy-this-code prompt and 20 random prompts, with prompt lookup (k=4), with a draft model at k = 1, 2
and 4, and with an EAGLE head at k = 1 and 4.

Low-precision weights and activations leave near-ties among the logits, so any difference in how a verified position
is computed (another attention path, another GEMV/GEMM kernel) flips tokens within a few dozen; exactness here holds
by construction: each verified position is computed bit for bit as the decode step at that position. Requests run one
at a time, so the step without speculation and the verifying step have the same batch, and the prefix cache is
emptied before each: a prompt that finds its first block cached from an earlier run prefills fewer rows, which
changes the prefill GEMM's blocking and so the last bits of its K/V, with or without speculation (measured: 4 of 35
prompts flip when the same engine runs them twice without the reset).
The draft is the teacher's first three layers with a 4096-token head: it agrees with it often enough to accept and
reject plenty, which is all exactness needs.
The EAGLE head is untrained and rarely right on these prompts (a head trained for seconds on them was not either), so
its test asserts proposals were verified, not that some were accepted: what it adds to the draft tests is the
target's hidden states being read out of every forward (the fused decoder stack's and the per-op path's) without
changing a token; accepted EAGLE proposals are verified exactly in tests/test_spec_decode_eagle.py."""
import dataclasses

import pytest
import torch

from pernode import LLM, SamplingParams
from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.models.loader import build_model
from pernode.shrink.distill.draft_vocab import write_draft_vocab
from pernode.shrink.distill.student import StudentSpec, build_student
from pernode.shrink.distill.student_checkpoint import save_student
from test_spec_decode import README_PROMPTS, random_prompts

pytestmark = pytest.mark.slow
MAX_TOKENS = 10
ENGINE = dict(max_model_len=256, max_num_batched_tokens=256)


COPY_CODE = "Repeat this code exactly:\n```python\ndef add(a, b):\n    return a + b\n```\n"  # prompt lookup's case


@pytest.fixture(scope="module")
def prompts():
    # the random prompts' ids over the model's whole vocabulary; shorter ones keep the test fast
    return README_PROMPTS + [COPY_CODE] + [p[:24] for p in random_prompts(count=20)]


def run(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = []
    for p in prompts:  # one at a time: batch 1 in both engines, each prefilled whole
        assert llm.reset_prefix_cache()
        (o,) = llm.generate([p], params)
        out.append(list(o.outputs[0].token_ids))
    return out


@pytest.fixture(scope="module")
def baseline(default_gguf_path, prompts):
    return run(LLM(default_gguf_path, **ENGINE), prompts)


@pytest.fixture(scope="module")
def teacher(default_model_source):
    return build_model(default_model_source, "cpu", torch.float32)


@pytest.fixture(scope="module")
def draft_llm(default_gguf_path, default_model_source, teacher, tmp_path_factory):
    student, _ = build_student(teacher, StudentSpec(layers=(0, 1, 2)))
    folder = save_student(student, default_model_source, str(tmp_path_factory.mktemp("draft") / "draft"))
    write_draft_vocab(folder, list(range(4096)))  # a reduced head (FR-Spec): the draft's lm_head costs 1/12
    return LLM(default_gguf_path, speculative=f"draft={folder},k=4,adaptive=false", **ENGINE)


def check_identical(llm, prompts, baseline, need_acceptance=True):
    before = llm.engine.stats().spec_decode
    outputs = run(llm, prompts)
    differing = [i for i, (a, b) in enumerate(zip(outputs, baseline)) if a != b]
    assert not differing, f"{len(differing)} of {len(prompts)} prompts differ, the first is prompt {differing[0]}"
    after = llm.engine.stats().spec_decode
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    assert 0 < accepted < drafted if need_acceptance else drafted > 0  # acceptances and rejections verified


def test_greedy_identical_with_prompt_lookup(default_gguf_path, prompts, baseline):
    check_identical(LLM(default_gguf_path, speculative="ngram,k=4,adaptive=false", **ENGINE), prompts, baseline)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_identical_with_draft(draft_llm, prompts, baseline, k):
    speculator = draft_llm.engine.speculator
    speculator.config = dataclasses.replace(speculator.config, k=k)
    check_identical(draft_llm, prompts, baseline)


@pytest.fixture(scope="module")
def eagle_llm(default_gguf_path, teacher, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("eagle") / "head")
    EagleHead.from_target(teacher, -1, seed=0).save(folder)
    return LLM(default_gguf_path, speculative=f"eagle={folder},k=4,adaptive=false", **ENGINE)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_with_eagle(eagle_llm, prompts, baseline, k):
    speculator = eagle_llm.engine.speculator
    speculator.config = dataclasses.replace(speculator.config, k=k)
    check_identical(eagle_llm, prompts, baseline, need_acceptance=False)
