"""One distillation run end to end: data, teacher cache, student, KD training, the hard-label baseline at equal
steps, held-out perplexity, and the checkpoint the engine serves."""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.data import (distillation_text, is_heldout, pack_windows, shuffled_windows, stdlib_files,
                                        stdlib_root)
from pernode.shrink.distill.draft_vocab import (count_tokens, coverage, select_draft_vocab, special_token_ids,
                                                write_draft_vocab)
from pernode.shrink.distill.sequence_kd import chat_prompts, teacher_generations
from pernode.shrink.distill.student import StudentSpec, build_student
from pernode.shrink.distill.student_checkpoint import data_note, save_student
from pernode.shrink.distill.teacher_cache import build_teacher_cache, windows_fingerprint
from pernode.shrink.distill.trainer import TrainingConfig, autocast_dtype, train_student, training_threads
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.shrink.structured.plan import non_embedding_params

CHARS_PER_TOKEN = 3.0  # conservative for code and prose with this tokenizer: too much text is cheap, too little is not


@dataclass(frozen=True)
class DistillConfig:
    teacher: str
    out: str
    student: StudentSpec = StudentSpec(keep_layers=8)
    training: TrainingConfig = TrainingConfig()
    seq_len: int = 256
    stdlib_text: str = "files"  # "docstrings": the stdlib's prose only (data.STDLIB_TEXTS)
    docstring_packages: tuple[str, ...] = ()  # installed packages whose docstrings are training text too
    init_student: str | None = None  # a saved student to train on (continue a KD on fresh text); else built
    top_k: int = 64
    seq_kd_prompts: int = 64  # chat prompts the teacher answers (0: no sequence-level KD)
    seq_kd_max_tokens: int = 128
    draft_vocab: int = 0  # > 0: also write draft_vocab.json, the N most frequent tokens (FR-Spec draft head)
    eval_seq_len: int = 512
    eval_windows: int = 16
    hard_label_baseline: bool = True
    resume: bool = False
    num_threads: int | None = None  # None: training_threads() decides from the cores and the load
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, low in (("seq_len", 8), ("top_k", 1), ("seq_kd_prompts", 0), ("seq_kd_max_tokens", 1),
                          ("draft_vocab", 0),
                          ("eval_windows", 1), ("eval_seq_len", 8)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= {low}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} is out of range: allowed >= 1")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["student"], d["training"] = self.student.to_dict(), self.training.to_dict()
        return d


def training_windows(tokenizer, config: DistillConfig, teacher_model: str, log=print
                     ) -> tuple[torch.Tensor, dict, list[str], list[list[int]]]:
    """[N, seq_len] token windows (pydoc calibration part + stdlib files + teacher generations), shuffled, N just
    enough for the run's steps; the provenance of the text, the held-out texts and the teacher's generations."""
    needed = config.training.steps * config.training.batch_size
    wanted_tokens = needed * config.seq_len
    chars = int(wanted_tokens * CHARS_PER_TOKEN)
    for _ in range(3):  # prose runs ~4.5 characters a token: ask again for what the first guess left short
        text = distillation_text(chars, seed=config.training.seed, stdlib_text=config.stdlib_text,
                                 docstring_packages=config.docstring_packages)
        docs = [tokenizer.encode(t, add_special_tokens=False) for t in text.train]
        tokens, got_chars = sum(len(d) + 1 for d in docs), sum(map(len, text.train))
        if tokens >= wanted_tokens or got_chars < chars:  # enough, or the sources ran out
            break
        chars = int(chars * 1.1 * wanted_tokens / tokens)
    eos = tokenizer.eos_token_id
    provenance = dict(text.provenance)
    generated: list[list[int]] = []
    if config.seq_kd_prompts:
        train_paths = [p for p in stdlib_files() if not is_heldout(p)]
        prompts = chat_prompts(train_paths, config.seq_kd_prompts, config.training.seed, root=stdlib_root())
        log(f"sequence-level KD: the teacher answers {len(prompts)} chat prompts")
        generated = teacher_generations(teacher_model, prompts, config.seq_kd_max_tokens)
        docs += generated
        provenance["seq-kd"] = {"source": "the teacher's greedy replies (pernode's engine) to chat prompts about "
                                          "stdlib modules of the training split", "prompts": len(prompts),
                                "max_tokens": config.seq_kd_max_tokens,
                                "tokens": sum(len(g) for g in generated)}
    windows = shuffled_windows(pack_windows(docs, config.seq_len, eos), config.training.seed)
    provenance["windows"] = {"available": windows.shape[0], "used": min(needed, windows.shape[0]),
                             "seq_len": config.seq_len, "sha1": windows_fingerprint(windows[:needed])}
    return windows[:needed], provenance, text.heldout, generated


def _ppl(model, tokenizer, config: DistillConfig, corpus: str | None = None) -> float:
    return round(evaluate_perplexity(model, tokenizer, seq_len=config.eval_seq_len, max_windows=config.eval_windows,
                                     corpus=corpus, split=corpus is None).perplexity, 4)


def distill(config: DistillConfig, log=print) -> dict:
    """Run it; returns the result (also written as distill.json in the checkpoint folder)."""
    started = time.perf_counter()
    threads = config.num_threads or training_threads()
    torch.set_num_threads(threads)
    log(f"{threads} CPU thread(s); autocast {autocast_dtype(config.training.dtype, torch.device('cpu'))}")
    teacher, source = load_model(config.teacher)
    tok = source.tokenizer
    windows, provenance, heldout, generated = training_windows(tok, config, config.teacher, log)
    heldout_path = os.path.join(config.out, "heldout_stdlib.txt")
    os.makedirs(config.out, exist_ok=True)
    with open(heldout_path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(heldout))
    if config.init_student:
        student, layers = load_model(config.init_student)[0], []  # its layers were chosen by the run that made it
    else:
        calibration = (calibration_windows(tok, 256, max(8, config.student.refit_windows))
                       if config.student.needs_importance else None)
        student, layers = build_student(teacher, config.student, calibration)
    hard_student = copy.deepcopy(student) if config.hard_label_baseline else None
    log(f"student: teacher layers {layers}, {non_embedding_params(student.config) / 1e6:.1f}M non-embedding "
        f"parameters (teacher {non_embedding_params(teacher.config) / 1e6:.1f}M)")
    result: dict = {"teacher": config.teacher, "student_layers": layers, "config": config.to_dict(),
                    "teacher_non_embedding_params": non_embedding_params(teacher.config),
                    "student_non_embedding_params": non_embedding_params(student.config),
                    "num_threads": threads, "autocast": str(autocast_dtype(config.training.dtype, torch.device("cpu"))),
                    "data": provenance}
    result["param_ratio"] = round(result["student_non_embedding_params"] / result["teacher_non_embedding_params"], 4)
    amp = autocast_dtype(config.training.dtype, torch.device("cpu"))
    cache = None
    if config.training.alpha > 0:
        cache = build_teacher_cache(teacher, windows, os.path.join(config.out, "teacher_cache"), config.top_k,
                                    teacher_id=source.path, autocast_dtype=amp, quiet=config.quiet,
                                    temperature=config.training.temperature)
    log("perplexity (held-out pydoc, the fixed protocol) of the teacher and the untrained student")
    ppl = {"teacher": _ppl(teacher, tok, config), "student_init": _ppl(student, tok, config)}
    stdlib_ppl = {"teacher": _ppl(teacher, tok, config, heldout_path),
                  "student_init": _ppl(student, tok, config, heldout_path)}
    del teacher
    t0 = time.perf_counter()
    result["history_kd"] = train_student(student, windows, cache, config.training,
                                         os.path.join(config.out, "train_state"), config.resume, quiet=config.quiet)
    result["train_s_kd"] = round(time.perf_counter() - t0, 1)
    ppl["student_kd"] = _ppl(student, tok, config)
    stdlib_ppl["student_kd"] = _ppl(student, tok, config, heldout_path)
    if hard_student is not None:
        hard = dataclasses.replace(config.training, alpha=0.0)
        t0 = time.perf_counter()
        result["history_hard"] = train_student(hard_student, windows, None, hard,
                                               os.path.join(config.out, "hard-labels", "train_state"), config.resume,
                                               quiet=config.quiet)
        result["train_s_hard"] = round(time.perf_counter() - t0, 1)
        ppl["student_hard_labels"] = _ppl(hard_student, tok, config)
        stdlib_ppl["student_hard_labels"] = _ppl(hard_student, tok, config, heldout_path)
        save_student(hard_student, source, os.path.join(config.out, "hard-labels"))
        kd, hl = ppl["student_kd"], ppl["student_hard_labels"]
        result["kd_improvement_pct"] = round(100 * (hl - kd) / hl, 2)
    result["perplexity_pydoc"] = ppl
    result["perplexity_stdlib_heldout"] = stdlib_ppl
    result["eval"] = {"seq_len": config.eval_seq_len, "windows": config.eval_windows,
                      "pydoc": "shrink/evaluate's fixed protocol (evaluation split of pydoc_data.topics)",
                      "stdlib": f"{heldout_path} (held-out stdlib files), first windows"}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    save_student(student, source, config.out, details=result, data_note=data_note(provenance))
    if config.draft_vocab:
        ids = select_draft_vocab(count_tokens(generated, windows.tolist()), config.draft_vocab,
                                 student.config.vocab_size, special_token_ids(tok))
        write_draft_vocab(config.out, ids, {"source": "token counts of the training windows and the teacher's "
                                                      "replies (x4)",
                                            "reply_coverage": round(coverage(ids, generated), 4)})
    return result
