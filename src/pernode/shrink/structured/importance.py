"""Activation-based importance of heads, FFN channels and layers on calibration text: Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation" (Minitron, arXiv 2407.14679), sec. 2.2.

Head: mean L2 norm of its attention output; FFN channel: mean |silu(gate) * up|; layer: block importance
1 - cos(input, output) (Men et al. 2024, ShortGPT, arXiv 2403.03853): a layer that barely turns its input is the
cheapest to drop. Aggregated as means over all calibration tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pernode.shrink.training_forward import hidden_states


@dataclass(frozen=True)
class ActivationImportance:
    heads: torch.Tensor  # [layers, num_heads]
    ffn: torch.Tensor  # [layers, intermediate_size]
    layers: torch.Tensor  # [layers]


@torch.no_grad()
def measure_importance(model, windows: torch.Tensor, batch_size: int = 4) -> ActivationImportance:
    """Importance scores from windows [S, L] of calibration token ids, in fp32."""
    c = model.config
    heads = torch.zeros(c.num_hidden_layers, c.num_attention_heads, dtype=torch.float64)
    ffn = torch.zeros(c.num_hidden_layers, c.intermediate_size, dtype=torch.float64)
    block = torch.zeros(c.num_hidden_layers, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    tokens = 0

    def observe(i: int, kind: str, t: torch.Tensor) -> None:
        t = t.float()
        if kind == "heads":
            heads[i] += t.norm(dim=-1).sum(dim=(0, 1)).double()
        elif kind == "ffn":
            ffn[i] += t.abs().sum(dim=(0, 1)).double()
        elif kind == "input":
            inputs[i] = t
        else:
            block[i] += (1 - F.cosine_similarity(inputs.pop(i), t, dim=-1)).sum().double()

    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        hidden_states(model, batch, observe)
        tokens += batch.numel()
    return ActivationImportance(heads / tokens, ffn / tokens, block / tokens)
