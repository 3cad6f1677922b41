"""Training an EAGLE head on its own predictions: the "training-time test" of EAGLE-3 (Li, Wei, Zhang & Zhang
2025, arXiv 2503.01840).

When the engine drafts k tokens from the last verified position t, only the first draft reads a true feature;
draft 2 reads the head's own prediction of f_{t+1}, draft 3 the prediction of f_{t+2} made from that one, and so
on. A head trained only on true features (EAGLE-1's recipe) sees its own, drifted features for the first time at
serving, and its chain collapses: the second draft agrees far less often than the first. Here the head is unrolled
`depth` times over a training window, every depth predicting the same targets (f_{p+1} and the teacher's tokens
at p + 1) from a feature one step further from the truth:

    depth 1, position p:  input (f_p, x_{p+1})                  keys: depth-1 K/V at positions <= p
    depth d, position p:  input (prediction_{d-1}[p - 1], x_{p+1})
                          keys: depth-1 K/V at positions <= p - d + 1, and depth i's K/V at position p - (d - i)
                          for i = 2..d

which is exactly what the engine's d-th draft from t = p - d + 1 attends to: the head's cache over verified
positions (built from true features), then one key per draft before it. Positions p < d - 1 have no such draft and
are left out of depth d's loss.
"""
from __future__ import annotations

import torch

from pernode.serve.engine.spec_decode.eagle_head import EagleHead, rms_norm


def rollout_mask(length: int, depth: int, device: torch.device | None = None) -> torch.Tensor:
    """Allowed keys [length, depth * length] of depth `depth`'s queries over the depth-1..depth keys laid end to end
    (True: attend). Every row allows at least its own depth's key, so no softmax row is empty."""
    p = torch.arange(length, device=device)[:, None]
    col = torch.arange(length, device=device)[None, :]
    blocks = [col <= p - depth + 1]
    blocks += [col == p - (depth - i) for i in range(2, depth + 1)]
    return torch.cat(blocks, dim=1)


def rollout_predictions(head: EagleHead, features: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, final_norm: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The head's normed predictions [B, L, d] of f_{p+1} at every position p, one tensor per depth 1..depth
    (features f_p [B, L, d] and embed(x_{p+1}) [B, L, d] at positions 0..L-1; cos/sin [L, head_dim / 2])."""
    length = features.shape[1]
    keys, values, predictions = [], [], []
    inputs = features
    for d in range(1, depth + 1):
        if d > 1:  # position p reads the previous depth's prediction made at p - 1; position 0 has none (masked)
            previous = predictions[-1].to(features.dtype)
            inputs = torch.cat((torch.zeros_like(previous[:, :1]), previous[:, :-1]), dim=1)
        x = head.fc(torch.cat((inputs, next_embeds.to(inputs.dtype)), dim=-1).to(head.fc.weight.dtype))
        q, k, v = head.attention_inputs(x, cos, sin)
        keys.append(k)
        values.append(v)
        if d == 1:
            attended = head.attend(q, k, v, causal=True)
        else:
            attended = head.attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                   mask=rollout_mask(length, d, features.device))
        predictions.append(rms_norm(head.after_attention(x, attended), final_norm, head.eps))
    return predictions
