"""Training an EAGLE draft head (Li et al. 2024, arXiv 2401.15077) from the served model, offline, on CPU.

The target runs once over the training text: the teacher's own greedy replies to chat prompts, about stdlib modules
(sequence_kd) and general ones (general_prompts: what a draft is judged on), kept between runs (reply_cache), and the
pydoc/stdlib text of data.py. Its final-norm features (bf16) and top-k logits are kept in
memory. The head learns f_{t+1} from (f_t, x_{t+1}) with smooth-L1 on the features plus forward KL to the teacher
on the teacher's top-k tokens (both renormalised over those k: at T = 1 the gradient is within 0.3% of the exact
KL's direction, docs/distillation.md, and only k rows of the frozen lm_head are multiplied per position, not 49k),
with EAGLE's uniform noise on its input features; `depth` > 1 also unrolls the head on its own predictions
(EAGLE-3's training-time test, eagle_rollout.py), so later drafts are trained on what they read; and
`token_weight` adds a cross-entropy to the teacher's greedy token over the tokens the head drafts (its FR-Spec
subset). Batches and noise follow from (seed, step); the head is saved as safetensors + json at the end (a run is
minutes: no resume; the replies, its slow part, are kept in `replies_cache`).

Judged by `teacher_forced_acceptance`: on held-out chat replies, the head drafts k tokens from every position
(chained on its own predictions, its K/V over the prefix built from the true features) and a draft token counts
while every token before it matched the target's greedy token.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.models.loader import load_model
from pernode.shrink.distill.data import distillation_text, is_heldout, pack_windows, stdlib_files, stdlib_root
from pernode.shrink.distill.draft_vocab import (count_tokens, coverage, select_draft_vocab, special_token_ids,
                                                write_draft_vocab)
from pernode.shrink.distill.eagle_rollout import rollout_predictions
from pernode.shrink.distill.losses import TeacherTopK
from pernode.shrink.distill.progress import StepProgress
from pernode.shrink.distill.general_prompts import general_chat_prompts
from pernode.shrink.distill.reply_cache import greedy_replies
from pernode.shrink.distill.sequence_kd import chat_prompts, module_doc
from pernode.shrink.distill.trainer import warmup_cosine_lr
from pernode.shrink.training_forward import hidden_states


@dataclass(frozen=True)
class EagleTrainingConfig:
    teacher: str
    out: str
    chat_prompts: int = 48  # the teacher answers these (training split of stdlib modules)
    general_prompts: int = 0  # and these: general chat (general_prompts.py)
    replies_cache: str | None = None  # a JSON file keeping the teacher's replies between runs (reply_cache.py)
    draft_vocab: int = 0  # also write draft_vocab.json: the N tokens the replies and text use most (FR-Spec)
    chat_max_tokens: int = 96
    text_tokens: int = 2000  # pydoc/stdlib tokens beside the replies
    eval_prompts: int = 12  # held-out prompts of each kind (stdlib modules, general), answered by the teacher
    seq_len: int = 256
    top_k: int = 32
    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 10
    feature_weight: float = 1.0
    kd_weight: float = 0.1
    token_weight: float = 0.0  # cross-entropy to the teacher's greedy token over the draft's tokens (draft_vocab)
    noise: float = 0.1  # uniform noise U(-a, a) on input features, a relative to the features' RMS
    depth: int = 1  # unrolled drafts per position in training (eagle_rollout.py); 1 is EAGLE-1's recipe
    k_eval: int = 4
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name, low in (("chat_prompts", 0), ("general_prompts", 0), ("chat_max_tokens", 1), ("text_tokens", 0),
                          ("eval_prompts", 1),
                          ("seq_len", 16), ("top_k", 1), ("steps", 0), ("batch_size", 1), ("k_eval", 1),
                          ("threads", 1), ("depth", 1), ("draft_vocab", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= {low}")
        for name in ("feature_weight", "kd_weight", "token_weight", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is out of range: allowed > 0")


@torch.no_grad()
def target_features(model, windows: torch.Tensor, top_k: int, batch_size: int = 4, quiet: bool = False
                    ) -> tuple[torch.Tensor, TeacherTopK]:
    """The target's final-norm features [N, L, d] (bf16) and its top-k logits over windows [N, L]."""
    feats, values, indices, lse = [], [], [], []
    with StepProgress("target features", windows.shape[0], quiet=quiet) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f = hidden_states(model, batch)
                top = TeacherTopK.from_logits(F.linear(f, model.lm_head.weight), top_k)
            feats.append(f.to(torch.bfloat16))
            values.append(top.values.half())
            indices.append(top.indices.int())
            lse.append(top.log_normalizer.float())
            bar.advance(batch.shape[0])
    return torch.cat(feats), TeacherTopK(torch.cat(values), torch.cat(indices), torch.cat(lse))


@dataclass(frozen=True)
class DraftTokens:
    """The tokens the head scores at serving (its FR-Spec subset, or the whole vocabulary): their lm_head rows and
    each vocabulary id's column among them (-100: not scored)."""

    rows: torch.Tensor  # [V, d] float
    column: torch.Tensor  # [vocab] long

    @classmethod
    def of(cls, lm_weight: torch.Tensor, ids: list[int] | None) -> "DraftTokens":
        vocab = lm_weight.shape[0]
        index = torch.arange(vocab) if ids is None else torch.tensor(ids, dtype=torch.long)
        column = torch.full((vocab,), -100, dtype=torch.long)
        column[index] = torch.arange(len(index))
        return cls(lm_weight[index].float(), column)


def head_step_loss(head: EagleHead, model, windows: torch.Tensor, feats: torch.Tensor, teacher: TeacherTopK,
                   config: EagleTrainingConfig, generator: torch.Generator | None,
                   tokens: DraftTokens | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one batch: inputs (f_t, x_{t+1}) for t < L-1, targets f_{t+1} and the teacher's top-k at t+1, at
    every unrolled depth (eagle_rollout.py; depth d counts positions t >= d - 1), averaged over the depths."""
    f_in, f_out = feats[:, :-1].float(), feats[:, 1:].float()
    if generator is not None and config.noise > 0:
        scale = config.noise * f_in.pow(2).mean().sqrt()
        f_in = f_in + (torch.rand(f_in.shape, generator=generator) * 2 - 1) * scale
    positions = torch.arange(windows.shape[1] - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = rollout_predictions(head, f_in, model.embed_tokens(windows[:, 1:]), model.rotary.cos[positions],
                                    model.rotary.sin[positions], model.norm.weight, config.depth)
    # The student's logits on the teacher's top-k tokens only (k rows of the frozen lm_head, not 49k): at T = 1 the
    # renormalised top-k KL's gradient is within 0.3% of the exact one's direction (docs/distillation.md).
    rows = model.lm_head.weight[teacher.indices[:, 1:].long()].float()  # [B, L, k, d]
    p_log = F.log_softmax(teacher.values[:, 1:].float(), dim=-1)
    loss, parts = 0.0, {}
    for d, pred in enumerate(preds, start=1):
        pred, target, rows_d, p_d = pred[:, d - 1:].float(), f_out[:, d - 1:], rows[:, d - 1:], p_log[:, d - 1:]
        logits = torch.einsum("bld,blkd->blk", pred, rows_d)
        feature_loss = F.smooth_l1_loss(pred, target)
        kd = (p_d.exp() * (p_d - F.log_softmax(logits, dim=-1))).sum(-1).mean()
        step_loss = config.feature_weight * feature_loss + config.kd_weight * kd
        suffix = "" if d == 1 else f"_d{d}"
        parts.update({"feature" + suffix: feature_loss.item(), "kl" + suffix: kd.item(),
                      "top1" + suffix: (logits.argmax(-1) == 0).float().mean().item()})  # teacher's top-1: column 0
        if tokens is not None and config.token_weight > 0:  # the teacher's greedy token among all it can draft
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scores = pred @ tokens.rows.T
            target = tokens.column[teacher.indices[:, d:, 0].long()]
            token_loss = F.cross_entropy(scores.float().flatten(0, 1), target.flatten(), ignore_index=-100)
            step_loss = step_loss + config.token_weight * token_loss
            parts["ce" + suffix] = token_loss.item()
        loss = loss + step_loss / len(preds)
    return loss, parts


def train_head(head: EagleHead, model, windows: torch.Tensor, feats: torch.Tensor, teacher: TeacherTopK,
               config: EagleTrainingConfig, quiet: bool = False, draft_ids: list[int] | None = None) -> list[dict]:
    """AdamW on the head's parameters; the target is frozen. Batches and noise follow from (seed, step)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in head.parameters() if p.requires_grad]
    tokens = DraftTokens.of(model.lm_head.weight, draft_ids) if config.token_weight > 0 else None
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    with StepProgress("eagle head", config.steps, quiet=quiet) as bar:
        for step in range(config.steps):
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            idx = torch.randint(0, windows.shape[0], (config.batch_size,), generator=g)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(config.lr, step, config.warmup_steps, config.steps)
            loss, parts = head_step_loss(head, model, windows[idx], feats[idx],
                                         TeacherTopK(teacher.values[idx], teacher.indices[idx],
                                                     teacher.log_normalizer[idx]), config, g, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            history.append({"step": step, "loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()}})
            bar.advance(1, f"feat {parts['feature']:.4f} kl {parts['kl']:.3f} top1 {parts['top1']:.3f}")
    return history


@torch.no_grad()
def teacher_forced_acceptance(head: EagleHead, model, sequences: list[list[int]], reply_starts: list[int],
                              k: int, draft_ids: list[int] | None = None) -> dict:
    """On each sequence (prompt + the target's greedy reply), from every reply position t (x_{t+1} known, the
    target's bonus token), the head drafts k tokens chained on its own features; draft j counts if drafts 1..j all
    equal the target's tokens. Returns per-step agreement and the mean accepted length at k' = 1..k."""
    ids_of = None if draft_ids is None else torch.tensor(draft_ids, dtype=torch.long)
    lm_rows = model.lm_head.weight if ids_of is None else model.lm_head.weight[ids_of]

    def greedy(f: torch.Tensor) -> torch.Tensor:  # the head's token: over its FR-Spec subset when it has one
        best = F.linear(f, lm_rows).argmax(-1)
        return best if ids_of is None else ids_of[best]

    accepted_at = torch.zeros(k + 1)  # accepted_at[j]: starts whose first j drafts all matched
    starts = 0
    first_step_hits = 0
    for seq, reply_start in zip(sequences, reply_starts):
        ids = torch.tensor([seq])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = hidden_states(model, ids)[0].float()
        n = len(seq)
        # True-feature pass: position t sees (f_t, x_{t+1}) for t < n - 1; its K/V is the prefix for drafts.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, (k_all, v_all) = head(feats[None, :-1], model.embed_tokens(ids[:, 1:]), torch.arange(n - 1),
                                        model.rotary.cos, model.rotary.sin, model.norm.weight)
            first = greedy(pred)[0]  # draft 1 from each t: token t + 2
        for t in range(max(reply_start - 1, 0), n - 2):
            starts += 1
            hit = int(first[t]) == seq[t + 2]
            first_step_hits += hit
            if not hit:
                accepted_at[0] += 1
                continue
            past = (k_all[:, :, :t + 1], v_all[:, :, :t + 1])
            f_prev, token, depth = pred[:, t:t + 1].float(), int(first[t]), 1
            while depth < k and t + 2 + depth < n:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    f_next, past = head(f_prev, model.embed_tokens(torch.tensor([[token]])),
                                        torch.tensor([t + depth]), model.rotary.cos, model.rotary.sin,
                                        model.norm.weight, past)
                    token = int(greedy(f_next))
                if token != seq[t + 2 + depth]:  # draft depth + 1 is the token at t + 2 + depth
                    break
                f_prev, depth = f_next.float(), depth + 1
            accepted_at[min(depth, k)] += 1
    # accepted_at[j] counts starts with exactly j accepted drafts (capped at k): accepted length at k' is min(j, k').
    counts = accepted_at
    out = {"positions": starts, "top1_agreement": round(first_step_hits / max(starts, 1), 4)}
    for kk in range(1, k + 1):
        mean_acc = sum(min(j, kk) * counts[j].item() for j in range(k + 1)) / max(starts, 1)
        out[f"mean_accepted_k{kk}"] = round(mean_acc, 4)  # drafts accepted per verify step, before the bonus token
    out["chained_agreement"] = [round(sum(counts[j].item() for j in range(i, k + 1)) / max(starts, 1), 4)
                                for i in range(1, k + 1)]  # P(first i drafts all match)
    return out


def chat_sequences(teacher: str, prompts: list[str], max_tokens: int, tokenizer, cache: str | None = None,
                   log=print) -> tuple[list[list[int]], list[int]]:
    """The served model's greedy replies (pernode's engine, default dtype, kept in `cache`); each sequence and
    where its reply starts."""
    seqs = greedy_replies(teacher, prompts, max_tokens, cache=cache, log=log)
    starts = []
    for p in prompts:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        starts.append(len(tokenizer.encode(rendered, add_special_tokens=False)))
    return seqs, starts


def training_prompts(config: EagleTrainingConfig, excluded: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(training, held-out) chat prompts: about stdlib modules (sequence_kd.py) and general chat
    (general_prompts.py), each from its own split of the stdlib files; none is in `excluded` (the benchmark's)."""
    root, files = stdlib_root(), stdlib_files()
    train_files = [p for p in files if not is_heldout(p)]
    heldout_files = [p for p in files if is_heldout(p)]
    train = chat_prompts(train_files, config.chat_prompts, config.seed, root=root)
    held = chat_prompts(heldout_files, config.eval_prompts, config.seed + 1, root=root)
    if config.general_prompts:
        paragraphs = [d for d in (module_doc(root, p) for p in train_files) if d]
        train += general_chat_prompts(config.general_prompts, paragraphs, config.seed, excluded)
        paragraphs = [d for d in (module_doc(root, p) for p in heldout_files) if d]
        held += general_chat_prompts(config.eval_prompts, paragraphs, config.seed + 1, excluded + tuple(train))
    return train, held


def train_eagle_head(config: EagleTrainingConfig, log=print, quiet: bool = False,
                     excluded_prompts: tuple[str, ...] = ()) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model, source = load_model(config.teacher)
    tok = source.tokenizer
    train_prompts, eval_prompts = training_prompts(config, excluded_prompts)
    log(f"the served model answers {len(train_prompts)} training and {len(eval_prompts)} held-out chat prompts")
    seqs, starts = chat_sequences(config.teacher, train_prompts + eval_prompts, config.chat_max_tokens, tok,
                                  config.replies_cache, log)
    replies, eval_seqs, eval_starts = seqs[:len(train_prompts)], seqs[len(train_prompts):], starts[len(train_prompts):]
    docs = list(replies)
    if config.text_tokens:
        text = distillation_text(int(config.text_tokens * 3.0), seed=config.seed)
        budget = config.text_tokens
        for t in text.train:
            ids = tok.encode(t, add_special_tokens=False)[:budget]
            docs.append(ids)
            budget -= len(ids)
            if budget <= 0:
                break
    windows = pack_windows(docs, config.seq_len, tok.eos_token_id)
    windows = windows[torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(config.seed))]
    log(f"{windows.shape[0]} windows of {config.seq_len} tokens "
        f"({sum(len(r) for r in replies)} tokens of replies, the rest pydoc/stdlib text)")
    t0 = time.perf_counter()
    feats, teacher = target_features(model, windows, config.top_k, quiet=quiet)
    features_s = time.perf_counter() - t0
    draft_ids = None
    if config.draft_vocab:  # chosen before training: the token loss and the acceptance score over these tokens
        draft_ids = select_draft_vocab(count_tokens(replies, docs[len(replies):]), config.draft_vocab,
                                       model.config.vocab_size, special_token_ids(tok))
    head = EagleHead.from_target(model, -1, config.seed)
    t0 = time.perf_counter()
    history = train_head(head, model, windows, feats, teacher, config, quiet=quiet, draft_ids=draft_ids)
    train_s = time.perf_counter() - t0
    after = teacher_forced_acceptance(head, model, eval_seqs, eval_starts, config.k_eval, draft_ids)
    log(f"trained head: {after}")
    details = {"target": source.path, "training": asdict(config), "windows": windows.shape[0],
               "reply_tokens": sum(len(r) for r in replies), "features_s": round(features_s, 1),
               "train_s": round(train_s, 1), "acceptance": after,
               "eval": "held-out chat prompts (stdlib modules' and general, from held-out files), the served "
                       "model's greedy replies",
               "final_history": history[-5:], "elapsed_s": round(time.perf_counter() - started, 1)}
    head.save(config.out, details)
    if draft_ids is not None:
        write_draft_vocab(config.out, draft_ids, {
            "source": f"token counts: the served model's greedy replies to {len(replies)} chat prompts (x4) and "
                      f"{len(docs) - len(replies)} training documents of pydoc/stdlib text",
            "reply_coverage": round(coverage(draft_ids, replies), 4),
            "heldout_coverage": round(coverage(draft_ids, eval_seqs), 4)})
    with open(os.path.join(config.out, "history.json"), "w", encoding="utf-8") as f:
        json.dump(history, f)
    return details
