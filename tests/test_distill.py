"""Distillation: the KD loss against hand computations, the teacher's top-k cache, the student's initialisation,
exact resume, and the student checkpoint served by the engine. Tiny random models; no timing."""
from __future__ import annotations

import math

import pytest
import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.data import (distillation_text, docstrings, is_heldout, pack_windows, shuffled_windows,
                                        stdlib_files)
from pernode.shrink.distill.losses import Divergence, TeacherTopK, distillation_loss, soft_target_kl
from pernode.shrink.distill.student import StudentSpec, build_student
from pernode.shrink.distill.student_checkpoint import save_student
from pernode.shrink.distill.teacher_cache import TeacherCache, build_teacher_cache
from pernode.shrink.distill.trainer import TrainingConfig, batch_indices, train_student
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.structured.prune import evenly_spaced_layers
from pernode.shrink.training_forward import logits as training_logits
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("teacher")), tiny_config(num_hidden_layers=4))
    model, source = load_model(folder)
    return model, source, folder


def _windows(n: int = 6, length: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, 5000, (n, length), generator=torch.Generator().manual_seed(seed))


# --- the loss -------------------------------------------------------------------------------------------------

def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_forward_and_reverse_kl_match_a_hand_computation():
    s, te, t = [1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 1.0, 0.3], 2.0
    teacher = TeacherTopK.from_logits(torch.tensor([te]), k=4)  # k = vocab: the exact divergences
    p, q = _softmax(te, t), _softmax(s, t)
    fwd = soft_target_kl(torch.tensor([s]), teacher, t, Divergence.FORWARD_KL).item()
    rev = soft_target_kl(torch.tensor([s]), teacher, t, Divergence.REVERSE_KL).item()
    assert fwd == pytest.approx(_kl(p, q), rel=1e-5)
    assert rev == pytest.approx(_kl(q, p), rel=1e-5)
    assert fwd != pytest.approx(rev, rel=1e-2)


def test_topk_kl_with_a_rest_bucket_matches_a_hand_computation():
    """With the teacher's log-normaliser, top-k + one bucket for the rest, on both sides (never renormalised)."""
    s, te = [1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 1.0, 0.3]
    for t in (1.0, 2.0):
        teacher = TeacherTopK.from_logits(torch.tensor([te]), k=2, temperature=t)  # tokens 0 and 2
        p, q = _softmax(te, t), _softmax(s, t)
        p3, q3 = [p[0], p[2], p[1] + p[3]], [q[0], q[2], q[1] + q[3]]
        assert soft_target_kl(torch.tensor([s]), teacher, t).item() == pytest.approx(_kl(p3, q3), rel=1e-4)
        assert soft_target_kl(torch.tensor([s]), teacher, t, Divergence.REVERSE_KL).item() == pytest.approx(
            _kl(q3, p3), rel=1e-4)
        assert _kl(p3, q3) < _kl(p, q)  # coarsening never inflates the divergence
    # a normaliser taken at another temperature is not used: the top-k is renormalised then
    other = TeacherTopK.from_logits(torch.tensor([te]), k=2, temperature=1.0)
    plain = TeacherTopK(other.values, other.indices)
    assert soft_target_kl(torch.tensor([s]), other, 2.0).item() == pytest.approx(
        soft_target_kl(torch.tensor([s]), plain, 2.0).item(), rel=1e-6)


def test_topk_forward_kl_uses_the_students_full_vocabulary():
    s, te, t = [1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 1.0, 0.3], 1.0
    top = TeacherTopK.from_logits(torch.tensor([te]), k=2)  # tokens 0 and 2
    teacher = TeacherTopK(top.values, top.indices)  # no log-normaliser: renormalised over the top-k
    p = _softmax([2.0, 1.0], t)
    q_full = _softmax(s, t)
    expected = p[0] * math.log(p[0] / q_full[0]) + p[1] * math.log(p[1] / q_full[2])
    assert soft_target_kl(torch.tensor([s]), teacher, t).item() == pytest.approx(expected, rel=1e-5)
    q_top = _softmax([1.0, 0.5], t)  # reverse KL: the student renormalised on the same support
    assert soft_target_kl(torch.tensor([s]), teacher, t, Divergence.REVERSE_KL).item() == pytest.approx(
        _kl(q_top, p), rel=1e-5)


def test_loss_scales_soft_targets_by_t_squared_and_mixes_by_alpha():
    torch.manual_seed(0)
    s, te = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    teacher = TeacherTopK.from_logits(te, k=11)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), labels.reshape(-1)).item()
    for t, alpha in ((1.0, 0.5), (4.0, 0.3), (2.0, 1.0)):
        kl = soft_target_kl(s, teacher, t).item()
        loss, parts = distillation_loss(s, labels, teacher, t, alpha)
        assert loss.item() == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-5)
        assert parts["ce"] == pytest.approx(ce, rel=1e-6)
    hard, _ = distillation_loss(s, labels, teacher, 2.0, 0.0)
    assert hard.item() == pytest.approx(ce, rel=1e-6)
    # T^2 keeps the soft-target gradient's size: at large T it approaches the logit-matching gradient (Hinton 2.1)
    grads = []
    for t in (8.0, 16.0):
        x = s.clone().requires_grad_(True)
        (t * t * soft_target_kl(x, teacher, t)).backward()
        grads.append(x.grad.norm().item())
    assert grads[1] == pytest.approx(grads[0], rel=0.1)
    with pytest.raises(ValueError, match="alpha=1.5 is out of range"):
        distillation_loss(s, labels, teacher, 2.0, 1.5)


# --- data, cache, student ---------------------------------------------------------------------------------------

def test_data_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    assert files == sorted(files) and any(f.endswith("json/__init__.py") for f in files)
    heldout = {f for f in files if is_heldout(f)}
    assert 0.02 < len(heldout) / len(files) < 0.09
    a, b = distillation_text(200_000, seed=1), distillation_text(200_000, seed=1)
    assert a.train == b.train and a.heldout == b.heldout
    assert not set(a.train) & set(a.heldout)
    assert a.provenance["stdlib"]["train_chars"] > 100_000
    windows = pack_windows([[1, 2, 3], [4, 5]], 3, separator=0)
    assert windows.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert torch.equal(shuffled_windows(_windows(), 3), shuffled_windows(_windows(), 3))


def test_docstrings_only_text_is_the_stdlib_prose():
    source = '"""The module."""\nimport os\n\n\nclass A:\n    """A class."""\n\n    def f(self):\n        """Its method."""\n'
    assert docstrings(source) == "The module.\n\nA class.\n\nIts method."
    assert docstrings("def broken(:\n") == ""
    prose = distillation_text(100_000, seed=1, stdlib_text="docstrings")
    assert prose.provenance["stdlib"]["text"] == "docstrings" and prose.provenance["stdlib"]["train_chars"] > 50_000
    code = distillation_text(100_000, seed=1)
    defs = [sum(doc.count("def ") for doc in text.train[1:]) / sum(map(len, text.train[1:])) for text in (prose, code)]
    assert defs[0] < 0.1 * defs[1]  # docstrings quote a little code (doctests), files are mostly code
    with pytest.raises(ValueError, match="stdlib_text='code' is not allowed: one of files, docstrings, none"):
        distillation_text(1000, stdlib_text="code")


def test_package_docstrings_are_training_text_with_their_versions():
    import importlib.metadata
    text = distillation_text(60_000, seed=2, stdlib_text="none", docstring_packages=("numpy", "httpx"))
    packages = text.provenance["packages"]
    assert packages["versions"] == {"numpy": importlib.metadata.version("numpy"),
                                    "httpx": importlib.metadata.version("httpx")}
    assert text.provenance["stdlib"]["train_chars"] == 0 and text.heldout  # the stdlib held-out text stays
    assert packages["chars"] == sum(map(len, text.train[1:])) >= 60_000 - len(text.train[0])
    assert packages["files_used"] == len(text.train) - 1
    assert distillation_text(60_000, seed=2, stdlib_text="none", docstring_packages=("numpy", "httpx")).train \
        == text.train  # seeded: the same files in the same order
    for bad in ("no_such_package_xyz", "json.decoder"):
        with pytest.raises(ValueError, match=f"docstring_packages: '{bad}' is not an installed package"):
            distillation_text(1000, docstring_packages=(bad,))


def test_training_windows_fill_the_steps_from_prose(teacher):
    """Prose tokenizes at ~4.5 characters a token, not the 3 the first request assumes: the run still gets every
    window its steps need."""
    from pernode.shrink.distill.run import DistillConfig, training_windows
    _, source, _ = teacher
    config = DistillConfig(teacher="unused", out="unused", training=TrainingConfig(steps=40, batch_size=2),
                           seq_len=512, stdlib_text="docstrings", seq_kd_prompts=0)
    windows, provenance, _, _ = training_windows(source.tokenizer, config, "unused")
    assert windows.shape == (80, 512) and provenance["windows"]["available"] >= 80


def test_teacher_topk_cache_round_trips(teacher, tmp_path):
    model, source, folder = teacher
    windows = _windows()
    cache = build_teacher_cache(model, windows, str(tmp_path), k=8, teacher_id=folder, batch_size=4,
                                shard_windows=4, quiet=True)
    assert len(cache.meta["shards"]) == 2
    loaded = TeacherCache.load(str(tmp_path))
    with torch.no_grad():
        expected = TeacherTopK.from_logits(training_logits(model, windows), 8)
    assert torch.equal(loaded.windows, windows)
    assert torch.equal(loaded.indices.long(), expected.indices)
    torch.testing.assert_close(loaded.values.float(), expected.values, atol=2e-2, rtol=2e-3)  # stored as fp16
    assert TeacherCache.matching(str(tmp_path), windows, folder, 8) is not None
    assert TeacherCache.matching(str(tmp_path), windows, folder, 8, temperature=2.0) is None
    torch.testing.assert_close(loaded.log_normalizer, expected.log_normalizer, atol=1e-3, rtol=1e-4)
    assert loaded[0].temperature == 1.0 and loaded[0].log_normalizer.shape == windows[0].shape
    assert TeacherCache.matching(str(tmp_path), windows, folder, 4) is None
    assert TeacherCache.matching(str(tmp_path), _windows(seed=1), folder, 8) is None


def test_training_forward_equals_the_engine_forward(teacher):
    model = teacher[0]
    windows = _windows(2, 33)
    with torch.no_grad():
        ours = training_logits(model, windows)
        engine = model.lm_head(final_hidden_states(model, windows)).view(2, 33, -1)
    torch.testing.assert_close(ours, engine, atol=1e-4, rtol=1e-4)


def test_student_copies_the_chosen_teacher_layers(teacher):
    model = teacher[0]
    student, layers = build_student(model, StudentSpec(layers=(0, 3)))
    assert layers == [0, 3] and student.config.num_hidden_layers == 2
    for new, old in enumerate(layers):
        for (name, p), (_, q) in zip(student.layers[new].named_parameters(), model.layers[old].named_parameters()):
            assert torch.equal(p, q), name
            assert p.data_ptr() != q.data_ptr()  # a copy: training the student leaves the teacher alone
    assert torch.equal(student.embed_tokens.weight, model.embed_tokens.weight)
    assert evenly_spaced_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert build_student(model, StudentSpec(keep_layers=2))[1] == [0, 3]
    with pytest.raises(ValueError, match="layers=0,9 is not allowed"):
        build_student(model, StudentSpec(layers=(0, 9)))


# --- training --------------------------------------------------------------------------------------------------

def test_resume_gives_the_same_weights_as_an_uninterrupted_run(teacher, tmp_path):
    model, source, folder = teacher
    windows = _windows(8, 17)
    cache = build_teacher_cache(model, windows, str(tmp_path / "cache"), k=16, teacher_id=folder, quiet=True)
    config = TrainingConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, dtype="fp32", checkpoint_every=2)
    straight, _ = build_student(model, StudentSpec(layers=(0, 2)))
    history = train_student(straight, windows, cache, config, str(tmp_path / "a"), quiet=True, log_every=1)
    resumed, _ = build_student(model, StudentSpec(layers=(0, 2)))
    train_student(resumed, windows, cache, config, str(tmp_path / "b"), quiet=True, stop_at=2,
                  log_every=1)
    again, _ = build_student(model, StudentSpec(layers=(0, 2)))  # a fresh process: weights from the saved state
    history_b = train_student(again, windows, cache, config, str(tmp_path / "b"), resume=True, quiet=True,
                              log_every=1)
    for (name, p), (_, q) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name
    assert [h["loss"] for h in history] == [h["loss"] for h in history_b]
    with pytest.raises(ValueError, match="different settings"):
        train_student(again, windows, cache, TrainingConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1,
                                                            dtype="fp32", checkpoint_every=2, alpha=0.2),
                      str(tmp_path / "b"), resume=True, quiet=True)


def test_kd_pulls_the_student_towards_the_teacher(teacher, tmp_path):
    model, _, folder = teacher
    windows = _windows(2, 17)  # every step sees the same two windows
    cache = build_teacher_cache(model, windows, str(tmp_path), k=64, teacher_id=folder, quiet=True)
    student, _ = build_student(model, StudentSpec(layers=(0, 3)))
    history = train_student(student, windows, cache, TrainingConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=0,
                                                                      dtype="fp32", alpha=1.0), quiet=True, log_every=1)
    assert history[-1]["kl"] < 0.7 * history[0]["kl"]


def test_batches_follow_from_seed_and_step_alone():
    first = [batch_indices(s, 3, 7, seed=5).tolist() for s in range(5)]
    assert first == [batch_indices(s, 3, 7, seed=5).tolist() for s in range(5)]
    assert sorted(sum(first, [])[:7]) == list(range(7))  # one epoch sees every window once


def test_training_config_names_bad_fields():
    with pytest.raises(ValueError, match="steps=0 is out of range"):
        TrainingConfig(steps=0)
    with pytest.raises(ValueError, match="dtype='fp8' is not supported"):
        TrainingConfig(dtype="fp8")
    with pytest.raises(ValueError, match="forward_kl"):
        TrainingConfig(divergence="kl")


# --- the checkpoint the engine serves ------------------------------------------------------------------------------

def test_student_checkpoint_is_served_by_the_engine(teacher, tmp_path):
    from pernode.serve.llm import LLM
    from pernode.serve.sampling.params import SamplingParams

    model, source, _ = teacher
    student, _ = build_student(model, StudentSpec(layers=(1, 2)))
    with torch.no_grad():
        student.layers[0].mlp.down_proj.weight.mul_(1.5)  # differs from the teacher's layer now
    folder = save_student(student, source, str(tmp_path / "student"), details={"x": 1}, data_note="# data\n")
    reloaded, reloaded_source = load_model(folder)
    assert reloaded.config.num_hidden_layers == 2
    windows = _windows(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(training_logits(reloaded, windows), training_logits(student, windows))
    llm = LLM(folder, num_blocks=16)
    prompt = "def parse(text):"
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    ids = reloaded_source.tokenizer.encode(prompt)
    expected = []
    with torch.no_grad():  # greedy by full re-forwards of the student itself
        for _ in range(6):
            expected.append(int(training_logits(student, torch.tensor([ids + expected]))[0, -1].argmax()))
    assert out.outputs[0].token_ids == expected


def test_cli_flags_map_to_the_student_and_name_conflicts():
    from pernode.cli import build_parser
    from pernode.cli.distill import config_from_args

    parse = build_parser().parse_args
    config = config_from_args(parse(["distill", "--out", "x", "--quick", "--structured", "ffn=1024,layers=20"]))
    assert config.student.keep_layers == 20 and config.student.layer_choice == "importance"
    assert config.student.width.ffn == 1024 and config.training.steps == 40
    default = config_from_args(parse(["distill", "--out", "x"]))
    assert default.student.keep_layers == 8 and default.draft_vocab == 0
    assert (default.training.temperature, default.training.alpha) == (1.0, 1.0)  # pure soft targets at T = 1
    assert config_from_args(parse(["distill", "--out", "x", "--draft-vocab", "4096"])).draft_vocab == 4096
    with pytest.raises(ValueError, match="both choose layers"):
        config_from_args(parse(["distill", "--out", "x", "--structured", "layers=20", "--keep-layers", "8"]))


def test_report_section_states_the_kd_comparison():
    from pernode.jobs.distillation import distillation_section

    result = {"teacher_non_embedding_params": 106e6, "student_non_embedding_params": 28e6, "param_ratio": 0.2667,
              "student_layers": [0, 29], "config": {"training": {"steps": 40}}, "kd_improvement_pct": -12.5,
              "perplexity_pydoc": {"teacher": 16.8, "student_init": 1e6, "student_hard_labels": 400.0,
                                   "student_kd": 450.0},
              "decode": {"teacher": {"b1_tok_s": 4.0, "b32_tok_s": 40.0}, "student": {"b1_tok_s": 10.0,
                                                                                   "b32_tok_s": 90.0}}}
    section = distillation_section(result)
    assert "raises held-out perplexity by 12.5%" in section["text"]
    assert [r[0] for r in section["rows"]][-1] == "student, KD, 40 steps"
    assert section["rows"][-1][2] == 450.0 and section["rows"][-1][4] == 10.0


def test_chat_prompts_are_seeded_and_quote_module_docstrings(tmp_path):
    from pernode.measure.bench.datasets import CHAT_MIX
    from pernode.shrink.distill.sequence_kd import chat_prompts

    (tmp_path / "pkg").mkdir()
    doc = "Tools for counting things. " * 5
    (tmp_path / "alpha.py").write_text(f'"""{doc}\n\nSecond paragraph, never quoted."""\n')
    (tmp_path / "pkg" / "__init__.py").write_text("x = 1\n")  # no docstring: asked about by name
    (tmp_path / "_private.py").write_text('"""Private."""\n')
    paths = ["alpha.py", "pkg/__init__.py", "_private.py"]
    prompts = chat_prompts(paths, 8, seed=1, root=str(tmp_path))
    assert prompts == chat_prompts(paths, 8, seed=1, root=str(tmp_path)) and len(prompts) == 8
    assert not any("_private" in p or "Private." in p for p in prompts)
    quoted = [p for p in prompts if doc.strip() in p]
    assert quoted and all("Second paragraph" not in p for p in prompts)
    assert any("`pkg`" in p for p in prompts)
    assert not set(prompts) & {text for text, _ in CHAT_MIX}  # the benchmark's prompts are never trained on
    assert all("{" not in p for p in chat_prompts(paths, 8, seed=1))  # without root: names only
