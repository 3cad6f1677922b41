"""The EAGLE proposer on a tiny random model: greedy output token-for-token equal to the engine without
speculation (README and 32 random prompts, k = 1..4), prefix caching and preemption unchanged by it, seeded sampling
reproducible; the head's incremental path (catch-up on true features, chained drafts on its own K/V) equal to its
full-sequence forward; the head's folder round-trips; a few training steps lower its loss."""
import pytest
import torch

from pernode import LLM, SamplingParams
from pernode.config import SpeculativeConfig
from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.models.loader import load_model
from pernode.shrink.distill.eagle_training import (EagleTrainingConfig, target_features, teacher_forced_acceptance,
                                                   train_head)
from pernode.shrink.training_forward import hidden_states
from test_spec_decode import README_PROMPTS, greedy, ids, random_prompts
from test_spec_decode import target  # noqa: F401  (the module fixture: a tiny model that often repeats itself)

ENGINE = dict(num_blocks=192, max_model_len=384)


@pytest.fixture(scope="module")
def head_folder(target, tmp_path_factory):  # noqa: F811
    model, _ = load_model(target)
    folder = str(tmp_path_factory.mktemp("eagle") / "head")
    EagleHead.from_target(model, -1, seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def baseline(target):  # noqa: F811
    llm = LLM(target, **ENGINE)
    return {"readme": ids(llm.generate(README_PROMPTS, greedy())),
            "random": ids(llm.generate(random_prompts(), greedy()))}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_identical_with_eagle(target, head_folder, baseline, k):  # noqa: F811
    llm = LLM(target, speculative=f"eagle={head_folder},k={k},adaptive=false", **ENGINE)
    assert ids(llm.generate(README_PROMPTS, greedy())) == baseline["readme"]
    assert ids(llm.generate(random_prompts(), greedy())) == baseline["random"]
    stats = llm.engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # acceptances and rejections both verified
    llm.engine.kv.check_no_leak()


def test_eagle_prefix_cache_preemption_and_adaptive(target, head_folder, baseline):  # noqa: F811
    llm = LLM(target, speculative=f"eagle={head_folder},k=3,adaptive=false", num_blocks=24, max_model_len=384)
    prompts = random_prompts()
    assert ids(llm.generate(prompts, greedy())) == baseline["random"]
    assert llm.engine.stats().num_preemptions > 0
    assert ids(llm.generate(prompts, greedy())) == baseline["random"]  # prompts now from the prefix cache
    assert llm.engine.stats().prefix_cache_hits > 0
    llm.engine.kv.check_no_leak()
    adaptive = LLM(target, speculative=f"eagle={head_folder},k=4", **ENGINE)
    assert ids(adaptive.generate(random_prompts(), greedy())) == baseline["random"]


def test_eagle_seeded_sampling_reproducible(target, head_folder):  # noqa: F811
    llm = LLM(target, speculative=f"eagle={head_folder},k=3,adaptive=false", **ENGINE)
    params = SamplingParams(n=3, temperature=1.5, top_k=50, seed=7, max_tokens=20, ignore_eos=True)
    first, again = llm.generate(["Hello"], params)[0], llm.generate(["Hello"], params)[0]
    assert all(len(o.token_ids) == 20 for o in first.outputs)
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    llm.engine.kv.check_no_leak()


def test_head_incremental_equals_full_sequence_and_round_trips(target, head_folder):  # noqa: F811
    model, _ = load_model(target)
    head = EagleHead.load(head_folder)
    with torch.no_grad():
        head.fc.weight.add_(0.05 * torch.randn(head.fc.weight.shape, generator=torch.Generator().manual_seed(1)))
    ids_ = torch.randint(1000, 49152, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = hidden_states(model, ids_)
        emb = model.embed_tokens(ids_[:, 1:])
        args = (model.rotary.cos, model.rotary.sin, model.norm.weight)
        full, _ = head(feats[:, :-1], emb, torch.arange(11), *args)
        first, past = head(feats[:, :6], emb[:, :6], torch.arange(6), *args)  # catch-up on 6 pairs
        rest = []
        for t in range(6, 11):  # then one pair at a time on the cache
            out, past = head(feats[:, t:t + 1], emb[:, t:t + 1], torch.tensor([t]), *args, past=past)
            rest.append(out)
        torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, atol=1e-5, rtol=1e-5)
        two, _ = head(feats[:, 6:8], emb[:, 6:8], torch.arange(6, 8), *args,
                      past=(past[0][:, :, :6], past[1][:, :, :6]))  # a chunk on a prefix: causal inside it
        torch.testing.assert_close(two, full[:, 6:8], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eagle="):
        EagleHead.load(str(target))  # a model folder, not a head


def test_training_lowers_the_loss_and_acceptance_is_counted(target, tmp_path):  # noqa: F811
    model, _ = load_model(target)
    windows = torch.randint(1000, 49152, (4, 32), generator=torch.Generator().manual_seed(3))
    windows[:, 16:] = windows[:, :16]  # a repeated half: something a head can learn
    feats, teacher = target_features(model, windows, top_k=8, quiet=True)
    head = EagleHead.from_target(model, -1, seed=0)
    config = EagleTrainingConfig(teacher=target, out=str(tmp_path), steps=30, batch_size=4, lr=3e-3, warmup_steps=2)
    history = train_head(head, model, windows, feats, teacher, config, quiet=True)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    seqs = windows.tolist()
    result = teacher_forced_acceptance(head, model, seqs, [4] * len(seqs), k=3)
    assert result["positions"] == sum(len(s) - 2 - 3 for s in seqs)
    chained = result["chained_agreement"]
    assert chained[0] == result["top1_agreement"] and chained == sorted(chained, reverse=True)
    assert result["mean_accepted_k1"] <= result["mean_accepted_k2"] <= result["mean_accepted_k3"]


def test_eagle_option_parses_and_validates(head_folder):
    config = SpeculativeConfig.parse(f"eagle={head_folder},k=2")
    assert (config.method, config.draft_model, config.k) == ("eagle", head_folder, 2)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="eagle")


def test_eagle_reduced_vocabulary_head(target, head_folder, baseline, tmp_path):  # noqa: F811
    import shutil
    from pernode.shrink.distill.draft_vocab import write_draft_vocab
    folder = str(tmp_path / "head-fr")
    shutil.copytree(head_folder, folder)
    subset = sorted(set(t for seq in baseline["random"] for t in seq[::2]) | set(range(2, 4000)))
    write_draft_vocab(folder, subset)
    llm = LLM(target, speculative=f"eagle={folder},k=3,adaptive=false", **ENGINE)
    proposed = []
    propose = llm.engine.speculator.proposer.propose
    llm.engine.speculator.proposer.propose = lambda r, k: [proposed.extend(p.token_ids) or p for p in propose(r, k)]
    assert ids(llm.generate(random_prompts(), greedy())) == baseline["random"]
    stats = llm.engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert proposed and set(proposed) <= set(subset)
    sampled = llm.generate(["Hello"], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
    assert len(sampled[0].outputs[0].token_ids) == 12
