"""A differentiable full-sequence forward over the engine's own LlamaForCausalLM parameters, for training.

The serving forward writes K/V into a paged cache in place and runs kernels without autograd formulas; training
needs neither. This path reads the same parameters (fused qkv / gate_up, RMSNorm, the rotary tables) and uses plain
torch ops with causal SDPA, so the gradients land on the very tensors the engine later serves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pernode.serve.kernels.layer_ops import rms_norm_reference


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, head_dim] rotated in HF's rotate-half layout; cos/sin [L, head_dim/2] in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def attention_heads(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each query head's attention output before o_proj: [B, L, num_heads, head_dim] (causal, grouped-query)."""
    attn = layer.self_attn
    b, length, _ = h.shape
    qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = apply_rotary(q.view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2), cos, sin)
    k = apply_rotary(k.view(b, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)
    v = v.view(b, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    group = attn.num_heads // attn.num_kv_heads
    if group > 1:  # expand K/V to the query heads of their group (same order as the engine's kernels)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
    return out.transpose(1, 2)


def mlp_activations(layer, h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the FFN's intermediate channels [B, L, intermediate_size], what down_proj reads."""
    mlp = layer.mlp
    gate, up = F.linear(h, mlp.gate_up_proj.weight).split(mlp.intermediate_size, dim=-1)
    return F.silu(gate) * up


def layer_forward(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, observe=None) -> torch.Tensor:
    """One decoder layer on [B, L, hidden]; `observe(kind, tensor)` sees the head outputs and FFN channels."""
    h = rms_norm_reference(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
    heads = attention_heads(layer, h, cos, sin)
    if observe is not None:
        observe("heads", heads)
    x = x + F.linear(heads.flatten(2), layer.self_attn.o_proj.weight)
    h = rms_norm_reference(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    act = mlp_activations(layer, h)
    if observe is not None:
        observe("ffn", act)
    return x + F.linear(act, layer.mlp.down_proj.weight)


def rotary_tables(model, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if seq_len > model.rotary.cos.shape[0]:
        raise ValueError(f"seq_len={seq_len} is out of range: allowed <= {model.rotary.cos.shape[0]} "
                         "(the model's rotary table)")
    return model.rotary.cos[:seq_len].to(device), model.rotary.sin[:seq_len].to(device)


def hidden_states(model, input_ids: torch.Tensor, observe=None) -> torch.Tensor:
    """Final normed hidden states [B, L, hidden] of windows [B, L]; `observe(layer_index, kind, tensor)` sees
    each layer's input ("input"), output ("output"), head outputs and FFN channels."""
    cos, sin = rotary_tables(model, input_ids.shape[1], input_ids.device)
    x = model.embed_tokens(input_ids)
    for i, layer in enumerate(model.layers):
        hook = None if observe is None else (lambda kind, t, i=i: observe(i, kind, t))
        if hook:
            hook("input", x)
        x = layer_forward(layer, x, cos, sin, hook)
        if hook:
            hook("output", x)
    return rms_norm_reference(x, model.norm.weight, model.norm.eps)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, vocab] logits (in the autocast dtype when autocast is on)."""
    return F.linear(hidden_states(model, input_ids), model.lm_head.weight)
