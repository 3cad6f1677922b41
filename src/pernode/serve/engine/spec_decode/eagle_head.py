"""An EAGLE draft head: Li, Wei, Zhang & Zhang 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty" (arXiv 2401.15077).

The head drafts in the target's feature space. f_t is the target's last hidden state after its final norm (what
its lm_head reads). From f_t and the token x_{t+1} that follows it, the head predicts f_{t+1}:

    h = fc(concat(f_t, embed(x_{t+1})))          2d -> d
    h = one Llama decoder layer(h)               the target's width, initialised from its last layer
    f_{t+1} ~ final_norm(h)                      the target's frozen final norm
    token   = argmax lm_head(f_{t+1})            the target's frozen lm_head (or the FR-Spec rows of it)

and runs autoregressively on its own predictions for k steps. Its attention has its own K/V cache (one layer).
The embedding, final norm and lm_head are the target's and are not stored with the head: `head.safetensors`
holds fc and the layer, `head.json` the shapes and where the head came from (no pickle).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
LAYER_TENSORS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")
LINEAR_NAMES = ("fc", "qkv", "o", "gate_up", "down")  # the projections (fc carries a bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, head_dim] in HF's rotate-half layout; cos/sin [L, head_dim/2] (or [B, 1, L, ...])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class EagleHead(nn.Module):
    """fc + one decoder layer; `target` parts (embedding, final norm, lm_head, rotary tables) are borrowed."""

    def __init__(self, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, source: str = ""):
        super().__init__()
        self.hidden, self.intermediate, self.eps, self.source = hidden, intermediate, eps, source
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size, hidden))
        self.o = nn.Parameter(torch.zeros(hidden, self.q_size))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Parameter(torch.zeros(2 * intermediate, hidden))
        self.down = nn.Parameter(torch.zeros(hidden, intermediate))
        self.serving: dict[str, nn.Module] | None = None  # eagle_serving.py: the projections as int8 layers

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One of fc, qkv, o, gate_up, down on x: its serving-form layer when one is installed, else F.linear."""
        if self.serving is not None:
            return self.serving[name](x)
        if name == "fc":
            return self.fc(x.to(self.fc.weight.dtype))
        return F.linear(x, getattr(self, name).to(x.dtype))

    # ---- building, saving, loading -------------------------------------------------------------------------------

    def shape_dict(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "eps": self.eps}

    @classmethod
    def from_target(cls, model, layer_index: int = -1, seed: int = 0) -> "EagleHead":
        """A head the target's width; its decoder layer copies the target's layer `layer_index` (float weights),
        fc starts as [I | 0] on the feature half plus a small random embedding half (seeded)."""
        cfg = model.config
        head = cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.rms_norm_eps, source=f"layer {layer_index % cfg.num_hidden_layers}")
        layer = model.layers[layer_index]
        with torch.no_grad():
            head.input_norm.copy_(layer.input_layernorm.weight.float())
            head.qkv.copy_(dense_weight(layer.self_attn.qkv_proj))
            head.o.copy_(dense_weight(layer.self_attn.o_proj))
            head.post_norm.copy_(layer.post_attention_layernorm.weight.float())
            head.gate_up.copy_(dense_weight(layer.mlp.gate_up_proj))
            head.down.copy_(dense_weight(layer.mlp.down_proj))
            d = cfg.hidden_size
            g = torch.Generator().manual_seed(seed)
            head.fc.weight.zero_()
            head.fc.weight[:, :d] = torch.eye(d)
            head.fc.weight[:, d:] = torch.randn(d, d, generator=g) * 1e-3  # small: the layer first sees f_t
            head.fc.bias.zero_()
        return head

    def save(self, folder: str, details: dict | None = None) -> None:
        os.makedirs(folder, exist_ok=True)
        tensors = {"fc.weight": self.fc.weight, "fc.bias": self.fc.bias}
        tensors.update({name: getattr(self, name) for name in LAYER_TENSORS})
        save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                  os.path.join(folder, HEAD_WEIGHTS))
        with open(os.path.join(folder, HEAD_CONFIG), "w", encoding="utf-8") as f:
            json.dump({"kind": "eagle", **self.shape_dict(), "init": self.source, **(details or {})}, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "EagleHead":
        path = os.path.join(folder, HEAD_CONFIG)
        if not os.path.isfile(path):
            raise ValueError(f"eagle={folder}: no {HEAD_CONFIG} there (write one with `pernode draft-head`)")
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("kind") != "eagle":
            raise ValueError(f"eagle={folder}: {HEAD_CONFIG} has kind={meta.get('kind')!r}; allowed: 'eagle'")
        head = cls(meta["hidden"], meta["intermediate"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"],
                   meta["eps"], source=meta.get("init", ""))
        weights = load_file(os.path.join(folder, HEAD_WEIGHTS))
        with torch.no_grad():
            head.fc.weight.copy_(weights["fc.weight"].float())
            head.fc.bias.copy_(weights["fc.bias"].float())
            for name in LAYER_TENSORS:
                getattr(head, name).copy_(weights[name].float())
        return head

    def check_target(self, model) -> None:
        cfg = model.config
        if (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) != (
                self.hidden, self.num_heads, self.num_kv_heads):
            raise ValueError(f"eagle head: hidden={self.hidden}, heads={self.num_heads}/{self.num_kv_heads} do not "
                             f"match the target's {cfg.hidden_size}, {cfg.num_attention_heads}/"
                             f"{cfg.num_key_value_heads}")

    # ---- forward -------------------------------------------------------------------------------------------------

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, L, head_dim] of the layer's input x [B, L, d], rotated (k and v: the K/V cache's)."""
        b, length, _ = x.shape
        h = rms_norm(x, self.input_norm, self.eps)
        q, k, v = self.project("qkv", h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rotate(q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        return q, k, v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """Attention of q over k/v (grouped K/V heads repeated) -> [B, L, heads * head_dim]."""
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             scale=self.head_dim ** -0.5)
        return out.transpose(1, 2).flatten(2)

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual, o_proj and the SwiGLU MLP: the layer's output from its input x and the attention's."""
        x = x + self.project("o", attended)
        h = rms_norm(x, self.post_norm, self.eps)
        gate, up = self.project("gate_up", h).split(self.intermediate, dim=-1)
        return x + self.project("down", F.silu(gate) * up)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: tuple | None, causal: bool
               ) -> tuple[torch.Tensor, tuple]:
        """The decoder layer on x [B, L, d]; `past` = (K, V) [B, kv_heads, P, head_dim] before these positions."""
        length = x.shape[1]
        q, k, v = self.attention_inputs(x, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0].to(k.dtype), k), dim=2), torch.cat((past[1].to(v.dtype), v), dim=2)
        mask = None
        if causal and past is not None and length > 1:
            p = k.shape[2] - length  # queries see all of the past and the causal part of themselves
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(p)
        return self.after_attention(x, self.attend(q, k, v, mask, causal=causal and length > 1)), (k, v)

    def layer_output(self, features: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
               rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, past: tuple | None = None
               ) -> tuple[torch.Tensor, tuple]:
        """features f_t [B, L, d] and embed(x_{t+1}) [B, L, d] at positions t [L] (the position of f_t) -> (the
        layer's output [B, L, d] before the target's final norm, its (K, V) including these positions)."""
        x = self.project("fc", torch.cat((features, next_embeds.to(features.dtype)), dim=-1))
        return self._layer(x, rotary_cos[positions], rotary_sin[positions], past, causal=True)

    def forward(self, features: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, final_norm: torch.Tensor,
                past: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """`layer_output` through the target's final norm: the predicted f_{t+1} [B, L, d], and the (K, V)."""
        h, kv = self.layer_output(features, next_embeds, positions, rotary_cos, rotary_sin, past)
        return rms_norm(h, final_norm, self.eps), kv


def dense_weight(linear) -> torch.Tensor:
    """A float copy of an engine Linear's weight [out, in] (dequantized if it is a quantized layer)."""
    w = getattr(linear, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach().float()
    if hasattr(linear, "dequantized_weight"):
        return linear.dequantized_weight().float()
    raise ValueError(f"{type(linear).__name__}: no float weight to copy into the eagle head")
