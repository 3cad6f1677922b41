"""Least-squares refit of the output projections of a structurally pruned layer, layer by layer: o_proj from the
kept heads and down_proj from the kept FFN channels are solved (ridge regression) to reproduce what the dense
layer adds to the residual stream on the same input. Related to FLAP's bias compensation (An et al. 2024, arXiv
2312.11983), here as a full refit; each layer sees the outputs of the already pruned and refitted earlier layers,
so it also corrects the error that accumulated before it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pernode.serve.kernels.layer_ops import rms_norm_reference
from pernode.shrink.training_forward import attention_heads, mlp_activations, rotary_tables

# Measured on the default model with ffn=1024: 1,024 calibration tokens overfit (held-out ppl 127, against 30 without
# a refit), 4,096 help (26). Two tokens per unknown is the floor we accept.
MIN_TOKENS_PER_UNKNOWN = 2
RIDGE = 1e-3  # relative to the mean diagonal of A^T A: keeps rarely active channels from blowing up


def _solve(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """W [out, k] minimising |inputs @ W^T - targets|^2 + ridge |W|^2, in float64."""
    a, y = inputs.reshape(-1, inputs.shape[-1]).double(), targets.reshape(-1, targets.shape[-1]).double()
    gram = a.T @ a
    gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ y).T.float()


@torch.no_grad()
def refit_output_projections(dense, pruned, layer_indices: list[int], windows: torch.Tensor) -> list[dict]:
    """Refit pruned.layers[j]'s o_proj and down_proj against dense.layers[layer_indices[j]] on windows [S, L].
    Returns per layer the relative error of the layer's two residual contributions before and after."""
    unknowns = max(pruned.config.intermediate_size, pruned.config.num_attention_heads * pruned.config.head_dim)
    if windows.numel() < MIN_TOKENS_PER_UNKNOWN * unknowns:
        raise ValueError(f"refit_windows: {windows.numel()} calibration tokens for {unknowns} inputs per projection; "
                         f"allowed >= {MIN_TOKENS_PER_UNKNOWN * unknowns} tokens (fewer overfit the calibration text)")
    cos, sin = rotary_tables(pruned, windows.shape[1], windows.device)
    x = pruned.embed_tokens(windows)
    report = []
    for j, i in enumerate(layer_indices):
        small, big = pruned.layers[j], dense.layers[i]
        h = rms_norm_reference(x, small.input_layernorm.weight, small.input_layernorm.eps)
        attn_target = F.linear(attention_heads(big, h, cos, sin).flatten(2), big.self_attn.o_proj.weight)
        heads = attention_heads(small, h, cos, sin).flatten(2)
        before_attn = _relative_error(F.linear(heads, small.self_attn.o_proj.weight), attn_target)
        if small.self_attn.num_heads < big.self_attn.num_heads:  # all heads kept: o_proj is already exact
            small.self_attn.o_proj.weight.copy_(_solve(heads, attn_target))
        attn_out = F.linear(heads, small.self_attn.o_proj.weight)
        x = x + attn_out
        h = rms_norm_reference(x, small.post_attention_layernorm.weight, small.post_attention_layernorm.eps)
        target = F.linear(mlp_activations(big, h), big.mlp.down_proj.weight)
        act = mlp_activations(small, h)
        before_mlp = _relative_error(F.linear(act, small.mlp.down_proj.weight), target)
        small.mlp.down_proj.weight.copy_(_solve(act, target))
        mlp_out = F.linear(act, small.mlp.down_proj.weight)
        x = x + mlp_out
        report.append({"layer": i, "attn_error": [before_attn, _relative_error(attn_out, attn_target)],
                       "mlp_error": [before_mlp, _relative_error(mlp_out, target)]})
    return report


def _relative_error(value: torch.Tensor, target: torch.Tensor) -> float:
    return round(float((value - target).norm() / target.norm().clamp_min(1e-12)), 5)
