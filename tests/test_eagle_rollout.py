"""Training-time test for the EAGLE head (shrink/distill/eagle_rollout.py): the unrolled depth-d prediction at
position p is exactly the engine's d-th chained draft from t = p - d + 1 (its cache over true features to t, then
its own predicted features), the mask's rows are never empty, and training unrolled lowers the deeper depths' loss
too; the general chat prompts never repeat and never contain the benchmark's own; `pernode draft-head`'s training
end to end on a tiny model, answering each prompt once across runs."""
import json
import os

import pytest
import torch

from pernode.measure.bench.datasets import CHAT_MIX
from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.models.loader import load_model
from pernode.shrink.distill.eagle_rollout import rollout_mask, rollout_predictions
from pernode.shrink.distill.eagle_training import EagleTrainingConfig, target_features, train_eagle_head, train_head
from pernode.shrink.distill.general_prompts import general_chat_prompts
from pernode.shrink.training_forward import hidden_states
from test_spec_decode import target  # noqa: F401  (the module fixture: a tiny random model)


def test_rollout_mask_rows():
    assert torch.equal(rollout_mask(5, 1), torch.ones(5, 5, dtype=torch.bool).tril())
    m = rollout_mask(6, 3)
    assert m.shape == (6, 18) and bool(m.any(dim=1).all())
    # position 4 at depth 3: depth-1 keys 0..2, depth-2 key 3, depth-3 key 4
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 6 + 3, 12 + 4]


@pytest.mark.parametrize("depth", [2, 3])
def test_unrolled_depth_equals_the_engines_chained_drafts(target, depth):  # noqa: F811
    model, _ = load_model(target)
    head = EagleHead.from_target(model, -1, seed=0)
    with torch.no_grad():
        head.fc.weight.add_(0.05 * torch.randn(head.fc.weight.shape, generator=torch.Generator().manual_seed(1)))
        ids = torch.randint(1000, 49152, (1, 14), generator=torch.Generator().manual_seed(2))
        feats = hidden_states(model, ids)[:, :-1]
        emb = model.embed_tokens(ids[:, 1:])
        n = feats.shape[1]
        cos, sin, norm = model.rotary.cos, model.rotary.sin, model.norm.weight
        preds = rollout_predictions(head, feats, emb, cos[:n], sin[:n], norm, depth)
        for t in range(0, n - depth + 1):
            f, past = head(feats[:, :t + 1], emb[:, :t + 1], torch.arange(t + 1), cos, sin, norm)
            f = f[:, -1:]
            torch.testing.assert_close(preds[0][:, t], f[:, 0], atol=1e-5, rtol=1e-5)
            for d in range(2, depth + 1):  # draft d reads draft d-1's feature and the true next token
                p = t + d - 1
                f, past = head(f, emb[:, p:p + 1], torch.tensor([p]), cos, sin, norm, past)
                torch.testing.assert_close(preds[d - 1][:, p], f[:, 0], atol=1e-5, rtol=1e-5)


def test_training_unrolled_lowers_every_depths_loss(target, tmp_path):  # noqa: F811
    model, _ = load_model(target)
    windows = torch.randint(1000, 49152, (4, 32), generator=torch.Generator().manual_seed(3))
    windows[:, 16:] = windows[:, :16]
    feats, teacher = target_features(model, windows, top_k=8, quiet=True)
    head = EagleHead.from_target(model, -1, seed=0)
    config = EagleTrainingConfig(teacher=target, out=str(tmp_path), steps=30, batch_size=4, lr=3e-3,
                                 warmup_steps=2, depth=3)
    history = train_head(head, model, windows, feats, teacher, config, quiet=True)
    for suffix in ("", "_d2", "_d3"):  # every depth learns, the unrolled ones from their own predictions
        assert history[-1]["kl" + suffix] < 0.2 * history[0]["kl" + suffix]
        assert history[-1]["top1" + suffix] > 0.5 > history[0]["top1" + suffix]
    with pytest.raises(ValueError, match="depth=0"):
        EagleTrainingConfig(teacher=target, out=str(tmp_path), depth=0)


def test_general_chat_prompts_are_new_and_leave_the_benchmark_out():
    banned = tuple(p for p, _ in CHAT_MIX)
    prompts = general_chat_prompts(400, ["A paragraph to summarise, long enough to matter."], seed=0,
                                   excluded=banned)
    assert len(prompts) == 400 == len(set(prompts)) and not set(prompts) & set(banned)
    assert prompts == general_chat_prompts(400, ["A paragraph to summarise, long enough to matter."], seed=0,
                                           excluded=banned)
    assert all(not p.endswith(":\n\n") for p in general_chat_prompts(100, [], seed=1))  # no paragraph: form skipped
    assert len(general_chat_prompts(10**6, [], seed=0)) < 10**6  # the word lists run out: it stops


def test_draft_head_end_to_end_reuses_the_reply_cache(target, tmp_path):  # noqa: F811
    cache = str(tmp_path / "replies.json")
    config = EagleTrainingConfig(teacher=target, out=str(tmp_path / "head"), chat_prompts=2, general_prompts=6,
                                 chat_max_tokens=8, text_tokens=300, eval_prompts=2, seq_len=32, steps=3,
                                 depth=2, token_weight=1.0, draft_vocab=64, replies_cache=cache, k_eval=2)
    lines = []
    details = train_eagle_head(config, log=lines.append, quiet=True, excluded_prompts=(CHAT_MIX[0][0],))
    assert {"head.safetensors", "head.json", "draft_vocab.json"} <= set(os.listdir(tmp_path / "head"))
    assert details["acceptance"]["positions"] > 0 and "ce_d2" in details["final_history"][-1]
    with open(cache, encoding="utf-8") as f:
        answered = json.load(f)["replies"]
    assert len(answered) == 2 + 6 + 2 + 2  # training and held-out prompts, each answered once
    lines.clear()
    train_eagle_head(config, log=lines.append, quiet=True, excluded_prompts=(CHAT_MIX[0][0],))
    assert any("12 of 12 prompts already answered" in line for line in lines)
    with pytest.raises(ValueError, match="token_weight=-1"):
        EagleTrainingConfig(teacher=target, out=str(tmp_path), token_weight=-1)
