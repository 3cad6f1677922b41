"""A draft with a reduced-vocabulary head (FR-Spec): the subset's selection and file, and sampled requests keep the
target's distribution (chi-square on a bigram model whose draft scores a subset). The engine tests (greedy output
identical, proposals only from the subset) live in test_spec_decode.py beside its tiny target and draft."""
from collections import Counter

import pytest
import torch

from pernode.serve.engine.request import Request
from pernode.serve.engine.spec_decode.draft_vocab import ReducedVocabHead, read_draft_vocab
from pernode.serve.engine.spec_decode.rejection_sampler import ExtendedHistory, verify
from pernode.serve.models.llama import LlamaForCausalLM
from pernode.serve.sampling.sampler import draw, row_probs
from pernode.shrink.distill.draft_vocab import count_tokens, coverage, select_draft_vocab, write_draft_vocab
from test_spec_decode_sampling import (SETTINGS, VOCAB, bigram, chi_square, chi_square_critical,  # noqa: F401
                                       exact_pairs)
from tiny_model import tiny_config


def test_selection_keeps_the_most_frequent_and_the_special_tokens(tmp_path):
    counts = count_tokens(replies=[[5, 5, 7]], text=[[1, 1, 1, 1, 1, 2, 7]], reply_weight=4)
    assert counts == Counter({5: 8, 7: 5, 1: 5, 2: 1})
    assert select_draft_vocab(counts, 3, 10, always=[9]) == [1, 5, 9]  # 9 first, then 5 and (7 vs 1 by id) 1
    assert coverage([1, 5, 9], [[1, 5, 7, 9]]) == 0.75
    with pytest.raises(ValueError, match="size=11 is out of range: allowed 1..10"):
        select_draft_vocab(counts, 11, 10)
    write_draft_vocab(str(tmp_path), [1, 5, 9], {"source": "test"})
    assert read_draft_vocab(str(tmp_path), 10) == [1, 5, 9]
    with pytest.raises(ValueError, match="distinct ids in 0..4"):
        read_draft_vocab(str(tmp_path), 5)
    assert read_draft_vocab(str(tmp_path / "none"), 10) is None


SUBSET = [0, 2, 3, 5, 6]  # 5 of the bigram's 8 tokens


def reduced_speculative_pair(head, target, draft, params, context, seed, k=3):
    """As test_spec_decode_sampling.speculative_pair, the draft scoring only SUBSET through ReducedVocabHead."""
    request = Request("r", [context], params, [], seed=seed)
    while request.num_output_tokens < 2:
        proposed, probs = [], []
        for _ in range(k):
            sub_logits = draft[(request.all_token_ids + proposed)[-1]][SUBSET]
            q = row_probs(head.full_logits(sub_logits), ExtendedHistory(request, list(proposed)))
            token = draw(q, request.generator)
            assert token in SUBSET
            proposed.append(token)
            probs.append(q)
        rows = torch.stack([target[t] for t in (request.all_token_ids[-1:] + proposed)])
        for t in verify(rows, request, proposed, torch.stack(probs)):
            request.append_token(t)
    return tuple(request.output_token_ids[:2])


def test_rejection_sampling_with_a_reduced_head_keeps_the_target_distribution(bigram):  # noqa: F811
    """top-p over the draft's subset: the truncation sees only the subset's mass, and q is still exact."""
    target, draft = bigram
    model = LlamaForCausalLM(tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    head = ReducedVocabHead(model, SUBSET)
    assert model.lm_head.weight.shape == (len(SUBSET), 16)
    params, draws, context = SETTINGS["top_p"], 2500, 3
    expected = exact_pairs(target, params, context)
    observed: dict = {}
    for seed in range(draws):
        pair = reduced_speculative_pair(head, target, draft, params, context, seed)
        observed[pair] = observed.get(pair, 0) + 1
    assert any(a not in SUBSET for a, _ in observed)  # the target still says what the draft cannot
    stat, df = chi_square(observed, expected, draws)
    assert stat < chi_square_critical(df), (stat, df)
