"""About 50k calibration tokens of pydoc text that the fixed perplexity protocol never scores.

The default calibration split (the first 10% of the pydoc topics) holds ~10.7k tokens, 21 windows of 512. The
anchor calibrates on ~50k tokens of pydoc text, so this adds the part of the evaluation split that lies after the
windows `pernode eval ppl` scores (16 windows of 2048 tokens by default), so the scored text stays held out.
An evaluation on more windows than `eval_windows` would overlap this calibration text: decide on 16 windows."""
from __future__ import annotations

import torch

from pernode.shrink.evaluate.perplexity import DEFAULT_SEQ_LEN, corpus_text, split_corpus, token_windows


def held_out_windows(tokenizer, seq_len: int = 512, max_windows: int = 97, eval_seq_len: int = DEFAULT_SEQ_LEN,
                     eval_windows: int = 16) -> torch.Tensor:
    """[S, seq_len] windows: the calibration split's, then those of the evaluation split's tokens after its first
    `eval_windows` x `eval_seq_len` (the ones scored), up to `max_windows`."""
    if eval_windows < 1 or eval_seq_len < 2:
        raise ValueError(f"eval_windows={eval_windows}, eval_seq_len={eval_seq_len}: allowed >= 1 and >= 2")
    calib_text, eval_text = split_corpus(corpus_text())
    calib = tokenizer.encode(calib_text, add_special_tokens=False)
    scored_end = eval_windows * eval_seq_len
    tail = tokenizer.encode(eval_text, add_special_tokens=False)[scored_end:]
    head = token_windows(calib, seq_len)
    if len(head) >= max_windows:
        return head[:max_windows]
    rest = token_windows(tail, seq_len, max_windows - len(head)) if len(tail) >= seq_len else head[:0]
    return torch.cat([head, rest])
