"""The engine's greedy acceptance equals the replay of one teacher-forced pass of the draft over the target's own
output: any position, draft K/V catch-up, rollback or reduced-head mapping error in the incremental path shows up
as a gap between the two counts (a weak draft does not: it lowers both)."""
import os
import shutil

import pytest

from pernode import LLM
from pernode.serve.engine.spec_decode.teacher_forced import ReplayedAcceptance, agreement, replay_greedy
from test_spec_decode import (ENGINE, README_PROMPTS, draft, edit_weights, greedy, random_prompts,  # noqa: F401
                              reduced_draft, target)


def sharpened(source, folder):
    """A copy whose q/k projections are scaled up: sharp attention, so predictions depend on the context and on
    positions (a tiny random model's flat attention hides context errors: it mostly predicts from the last token)."""
    shutil.copytree(source, folder)
    edit_weights(folder, lambda w, g: [v.mul_(4.0) for k, v in w.items() if k.endswith(("q_proj.weight",
                                                                                          "k_proj.weight"))])
    return folder


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, target, draft):  # noqa: F811
    root = tmp_path_factory.mktemp("sharp")
    return sharpened(target, str(root / "target")), sharpened(draft, str(root / "draft"))


def test_replay_counts_rounds_by_hand():
    agree = [False, True, True, False, True, True, True, True]  # 8 output tokens
    r = replay_greedy(agree, k=3)
    # produced 1: accept 2 (1, 2), reject at 3 -> 4 produced; k=3 at 4: accept 4,5,6 -> 8; done
    assert (r.num_drafts, r.num_draft_tokens, r.num_accepted_tokens) == (2, 6, 5)
    r = replay_greedy(agree, k=1)  # rounds at 1 (ok, +2), 3 (rejected, +1), 4 (ok, +2), 6 (ok, +2): 8 produced
    assert (r.num_drafts, r.num_draft_tokens, r.num_accepted_tokens) == (4, 4, 3)
    with pytest.raises(ValueError, match="k=0"):
        replay_greedy(agree, k=0)


@pytest.mark.parametrize("k,subset", [(1, False), (3, True)])
def test_engine_acceptance_equals_teacher_forced_replay(sharp, tmp_path, k, subset):
    target, draft = sharp
    prompts = README_PROMPTS + random_prompts(3, seed=7)
    folder = draft
    if subset:  # a reduced head over every other token id
        folder = reduced_draft(str(tmp_path / "reduced"), draft, list(range(0, 49152, 2)))
    llm = LLM(target, speculative=f"draft={folder},k={k},adaptive=false", **ENGINE)
    proposer = llm.engine.speculator.proposer
    max_tokens = 20
    expected = ReplayedAcceptance()
    for prompt in prompts:  # one at a time: batch composition never changes a greedy draft's choice anyway
        before = llm.engine.stats().spec_decode
        out = llm.generate([prompt], greedy(max_tokens))[0]
        after = llm.engine.stats().spec_decode
        replayed = replay_greedy(agreement(proposer, out.prompt_token_ids, out.outputs[0].token_ids), k, max_tokens)
        assert (after.num_draft_tokens - before.num_draft_tokens,
                after.num_accepted_tokens - before.num_accepted_tokens) == (replayed.num_draft_tokens,
                                                                            replayed.num_accepted_tokens), prompt
        expected.add(replayed)
    assert 0 < expected.num_accepted_tokens < expected.num_draft_tokens  # the draft is neither useless nor exact
