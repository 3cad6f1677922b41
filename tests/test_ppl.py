"""Perplexity protocol: the split, the windows, and the number itself against a hand computation with
transformers' independent LlamaForCausalLM on the same tiny folder."""
from __future__ import annotations

import math

import pytest
import torch

from pernode.cli import main
from pernode.serve.models.loader import load_model
from pernode.shrink.evaluate.perplexity import corpus_text, evaluate_perplexity, split_corpus, token_windows
from tiny_model import tiny_config, write_tiny_model

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "\n") * 40


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = tiny_config(num_hidden_layers=2)
    return write_tiny_model(str(tmp_path_factory.mktemp("ppl") / "tiny"), cfg)


def test_split_is_deterministic_disjoint_and_covers_the_text():
    text = corpus_text()
    assert len(text) > 400_000  # the stdlib's pydoc topics
    calib, evaluation = split_corpus(text)
    assert calib + evaluation == text
    assert 0.09 < len(calib) / len(text) < 0.11 and calib.endswith("\n")
    assert split_corpus(corpus_text()) == (calib, evaluation)


def test_windows_are_non_overlapping_and_drop_the_tail():
    w = token_windows(list(range(10)), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert token_windows(list(range(10)), 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows([1, 2], 3)


def test_perplexity_matches_hand_computation_with_transformers(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model, source = load_model(tiny_folder)
    seq_len = 48
    result = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len, max_windows=3, corpus=str(corpus),
                                 split=False)

    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    ids = source.tokenizer.encode(TEXT, add_special_tokens=False)
    nll, count = 0.0, 0
    for w in range(3):
        window = torch.tensor(ids[w * seq_len:(w + 1) * seq_len])
        with torch.no_grad():
            logits = hf(window[None]).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(1, seq_len):
            nll -= logp[t - 1, window[t]].item()
            count += 1
    assert result.num_tokens == count == 3 * (seq_len - 1)
    assert result.mean_nll == pytest.approx(nll / count, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-3)


def test_cli_eval_ppl(tiny_folder, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    assert main(["eval", "ppl", "--model", tiny_folder, "--seq-len", "32", "--max-windows", "2",
                 "--corpus", str(corpus)]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("step_tokens", [1, 5])
def test_stepped_forward_matches_one_forward_per_window(tiny_folder, tmp_path, step_tokens):
    """Feeding a window a few tokens at a time through the carried KV cache is the same computation."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model, source = load_model(tiny_folder)
    kw = dict(seq_len=40, max_windows=2, corpus=str(corpus), split=False)
    whole = evaluate_perplexity(model, source.tokenizer, **kw)
    stepped = evaluate_perplexity(model, source.tokenizer, step_tokens=step_tokens, **kw)
    assert stepped.num_tokens == whole.num_tokens == 2 * 39
    assert stepped.mean_nll == pytest.approx(whole.mean_nll, rel=1e-5)
    with pytest.raises(ValueError, match="step_tokens=0"):
        evaluate_perplexity(model, source.tokenizer, step_tokens=0, **kw)
