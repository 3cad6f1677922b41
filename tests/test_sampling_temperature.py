"""Sampling stays well defined at the edges of its parameters: a tiny temperature is greedy (no inf/inf = NaN),
and no finite temperature > 0 with any top-k/top-p/min-p lets a NaN reach the draw."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pernode.serve.engine.request import Request
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.sampler import Sampler, sampling_probs

VOCAB = 64


def _request(params: SamplingParams, seed: int = 0) -> Request:
    return Request("r", [1, 2, 3], params, eos_token_ids=[2], seed=seed)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-40, 1e-8, 5e-324])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_temperature_samples_the_greedy_token(temperature, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, VOCAB, generator=g) * 5).to(dtype)
    greedy = Sampler()(logits, [_request(SamplingParams(temperature=0)) for _ in range(8)]).token_ids
    requests = [_request(SamplingParams(temperature=temperature, top_p=0.9, top_k=10), seed=i) for i in range(8)]
    assert Sampler()(logits, requests).token_ids == greedy


def test_tiny_temperature_with_penalties_and_min_tokens_is_greedy_on_the_processed_logits():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2)) * 5
    logits[0, 2] = 100.0  # eos would win, but min_tokens bans it
    params = dict(min_tokens=1, repetition_penalty=1.3, max_tokens=4)
    greedy = Sampler()(logits, [_request(SamplingParams(temperature=0, **params))]).token_ids
    tiny = Sampler()(logits, [_request(SamplingParams(temperature=1e-300, **params))]).token_ids
    assert tiny == greedy and tiny != [2]


finite_temperature = st.floats(min_value=5e-324, max_value=1e300, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(temperature=finite_temperature, top_p=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
       top_k=st.integers(min_value=-1, max_value=VOCAB + 4), min_p=st.floats(min_value=0.0, max_value=1.0),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30]), seed=st.integers(0, 2**31 - 1),
       masked=st.integers(0, VOCAB - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_no_nan_reaches_the_draw(temperature, top_p, top_k, min_p, scale, seed, masked, dtype):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    logits = (torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    logits[:masked] = float("-inf")  # some tokens already impossible (e.g. banned by min_tokens)
    probs = sampling_probs(logits.clone(), params)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert abs(float(probs.sum()) - 1.0) < 1e-3
    assert float(probs[:masked].sum()) == 0.0  # an impossible token stays impossible
    token = Sampler()(logits[None], [_request(params, seed=seed)]).token_ids[0]
    assert token >= masked and float(probs[token]) > 0
