"""A draft model proposes tokens: a smaller model with the target's tokenizer runs k cheap decode steps.

Speculative decoding with a draft model (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318).

The draft's KV cache is paged with the target's block tables: it has its own K/V tensors with the same number of
blocks, and a request's draft K/V for token i lives in the same block and slot as its target K/V. So the draft
needs no allocator of its own: the target's blocks already hold room for the proposed tokens (the speculator
allocates them before proposing), freeing a request frees both, and the rollback of rejected tokens is the
target's. Each request's draft progress is its own counter (`num_computed`), pulled back to the target's after
a rejection, and reset after a preemption (new blocks). Draft K/V is a deterministic function of the tokens, so
blocks shared through the prefix cache are only ever rewritten with the values they already hold.

A draft folder with a `draft_vocab.json` gets a reduced-vocabulary head (FR-Spec, draft_vocab.py): it scores only
those tokens, and its q for sampled requests is its distribution over them.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from pernode.config import ModelConfig, SpeculativeConfig
from pernode.serve.engine.request import Request
from pernode.serve.engine.spec_decode.adaptive import StepCostModel
from pernode.serve.engine.spec_decode.draft_vocab import ReducedVocabHead, read_draft_vocab
from pernode.serve.engine.spec_decode.proposal import Proposal
from pernode.serve.engine.spec_decode.rejection_sampler import ExtendedHistory, needs_per_position_processing
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.models.loader import build_model
from pernode.serve.models.registry import resolve_model
from pernode.serve.sampling.sampler import draw, is_greedy, row_probs
from pernode.serve.tokenizer import Tokenizer

_TOKENIZER_PROBE = "def speculative(x):\n    return x  # Überprüfung 東京 🙂"


def draft_kv_bytes_per_token(speculative: SpeculativeConfig | None, float_bytes: int) -> int:
    """Bytes of draft K/V one token occupies (0 without a draft): the draft's cache has as many blocks as the
    target's, so the KV budget (kv_cache_bytes) must pay for both per token."""
    if speculative is None or speculative.method != "draft":
        return 0
    return resolve_model(speculative.draft_model).config.kv_bytes_per_token(float_bytes)


class DraftModelProposer:
    needs_blocks_ahead = True  # writes K/V for its own proposed tokens

    def __init__(self, path: str, target_config: ModelConfig, target_tokenizer: Tokenizer, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype, max_model_len: int):
        source = resolve_model(path)
        if source.config.vocab_size != target_config.vocab_size:
            raise ValueError(f"speculative.draft_model={path!r} has vocab_size={source.config.vocab_size}, the "
                             f"served model {target_config.vocab_size}: the draft must share the tokenizer")
        if source.tokenizer.encode(_TOKENIZER_PROBE) != target_tokenizer.encode(_TOKENIZER_PROBE):
            raise ValueError(f"speculative.draft_model={path!r} tokenizes text differently from the served model: "
                             "the draft must share the tokenizer")
        self.config = source.config
        self.model = build_model(source, device, dtype, max_positions=max_model_len)
        self.model.use_fused_decoder()  # its one-token proposal steps are all per-layer overhead otherwise
        draft_vocab = read_draft_vocab(path, self.config.vocab_size)
        self.reduced_head = ReducedVocabHead(self.model, draft_vocab) if draft_vocab is not None else None
        self.device = device
        self.block_size = block_size
        c = self.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(c.num_hidden_layers)]
        self.num_computed: dict[str, tuple[int, int]] = {}  # request id -> (its num_preemptions, draft tokens done)
        self.forward_cost = StepCostModel()  # seconds of one draft forward (and its sampling) by its token count

    def forget(self, request_id: str) -> None:
        self.num_computed.pop(request_id, None)

    def _done(self, request: Request) -> int:
        """Tokens of `request` whose draft K/V is still valid."""
        preemptions, done = self.num_computed.get(request.request_id, (request.num_preemptions, 0))
        return min(done, request.num_computed_tokens) if preemptions == request.num_preemptions else 0

    def catch_up_tokens(self, request: Request, k_max: int) -> float:
        """Tokens the draft's first forward for `request` would read, as the adaptive rule should price them: the
        k_max + 1 a request brings after a verification in full; any beyond (its prompt, or what the target decoded
        while this request did not speculate) is paid once and serves every later step, so it is spread over the
        steps the request has left, about (tokens left) / (k_max + 1)."""
        pending = request.num_tokens - self._done(request)
        usual = min(pending, k_max + 1)
        left = (request.params.max_tokens or 1 << 30) - request.num_output_tokens
        return usual + (pending - usual) * min(1.0, (k_max + 1) / max(left, 1))

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Proposal]:
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        proposed: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        # step 1 catches each request's draft K/V up with its tokens (a prefill the first time) and proposes one
        feeds = []
        for i in active:
            done = self._done(requests[i])
            feeds.append((i, done, requests[i].all_token_ids[done:]))
        while feeds:
            started = time.perf_counter()
            logits = self._forward([requests[i] for i, _, _ in feeds], [(s, t) for _, s, t in feeds])
            next_feeds = []
            for row, (i, start, tokens) in enumerate(feeds):
                r = requests[i]
                token, q = self._sample(logits[row], r, proposed[i])
                proposed[i].append(token)
                if q is not None:
                    probs[i].append(q)
                self.num_computed[r.request_id] = (r.num_preemptions, start + len(tokens))
                if len(proposed[i]) < num_tokens[i]:
                    next_feeds.append((i, start + len(tokens), [token]))
            # timed to after the sampling, whose token ids already waited for the forward (no extra sync)
            self.forward_cost.record(sum(len(t) for _, _, t in feeds), time.perf_counter() - started)
            feeds = next_feeds
        return [Proposal(proposed[i], torch.stack(probs[i]) if probs[i] else None) for i in range(len(requests))]

    def _sample(self, logits: torch.Tensor, request: Request, proposed: list[int]) -> tuple[int, torch.Tensor | None]:
        """The draft's token under the request's own sampling rules, and the distribution it came from (None for
        greedy: one-hot, which the verifier treats as q(x) = 1). With a reduced head `logits` are over its subset."""
        head = self.reduced_head
        if is_greedy(request.params) and not needs_per_position_processing(request):
            index = int(logits.argmax())
            return (head.token_id(index) if head is not None else index), None
        if head is not None:
            logits = head.full_logits(logits)
        q = row_probs(logits, ExtendedHistory(request, list(proposed)))
        if is_greedy(request.params):
            return int(q.argmax()), None
        return draw(q, request.generator), q

    def _forward(self, requests: list[Request], chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """One draft forward over each request's tokens `chunk` starting at position `start`; the logits of each
        chunk's last token."""
        ids, positions, num_cached, lengths = [], [], [], []
        max_blocks = max(len(r.block_ids) for r in requests)
        tables = np.zeros((len(requests), max_blocks), dtype=np.int32)
        for i, (r, (start, tokens)) in enumerate(zip(requests, chunks)):
            ids.extend(tokens)
            positions.append(np.arange(start, start + len(tokens)))
            tables[i, :len(r.block_ids)] = r.block_ids
            num_cached.append(start)
            lengths.append(len(tokens))
        meta = AttentionMetadata.build(tables, num_cached, lengths, self.block_size, self.device)
        last = torch.tensor(meta.query_start_loc_cpu[1:], dtype=torch.long, device=self.device) - 1
        return self.model(torch.tensor(ids, dtype=torch.long, device=self.device),
                          torch.from_numpy(np.concatenate(positions)).to(self.device), self.kv_caches, meta, last)
