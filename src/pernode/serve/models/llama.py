"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, grouped-query attention, SwiGLU.

The forward takes a flat batch of tokens from many sequences and reads/writes K/V through a paged cache, so one
call serves any mix of prefill chunks and decodes.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pernode import envs
from pernode.config import ModelConfig
from pernode.envs import KernelChoice
from pernode.serve.kernels.attention import paged_attention, write_kv_cache
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.dense_linear import MAX_ROWS as DENSE_GEMV_MAX_ROWS
from pernode.serve.kernels.dense_linear import Linear
from pernode.serve.kernels.layer_ops import native_by_default as layer_ops_native_by_default
from pernode.serve.kernels.layer_ops import add_rms_norm, rms_norm, rotary_embedding_, silu_and_mul
from pernode.serve.kernels.quant_linear import QuantLinear, make_quantized_linear, replace_linears
from pernode.serve.models.fp32_logits import runs_in_fp32, sampled_logits
from pernode.serve.models.fused_decode import FusedDecoder


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.native = layer_ops_native_by_default()  # read once: decode calls this ~60 times a step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementations do; bf16 variance loses digits.
        return rms_norm(x, self.weight, self.eps, self.native)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its RMSNorm) in one pass: the residual add that precedes this norm, fused into it."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.native)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # Llama 3.1's frequency-dependent stretch
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported: allowed default, linear, llama3")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotates query/key halves (HF's rotate_half layout) by position-dependent angles."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config, self.max_positions = config, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.native = layer_ops_native_by_default()
        self.reset_cache()

    def reset_cache(self) -> None:
        """(Re)compute the fp32 angle tables on the module's device, e.g. after building on the meta device."""
        device = self.cos.device if self.cos.device.type != "meta" else None
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.config).to(positions.device))
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def rotate_(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Rotate the first `num_heads` heads (q then k) of each row of a fused qkv output, in place."""
        return rotary_embedding_(qkv, positions, self.cos, self.sin, num_heads, self.config.head_dim, self.native)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v share their input: one matmul instead of three.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5
        self.force_reference = envs.attention_kernel() is KernelChoice.REFERENCE  # read once, as the layers above

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        # q and k heads rotate together, in place in the projection's output
        qkv = self.rotary.rotate_(positions, self.qkv_proj(x), self.num_heads + self.num_kv_heads)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, self.force_reference)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # torch's vectorised ops (layer_ops.py)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, kv_cache, meta):
        h = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        x, normed = self.post_attention_layernorm.add_forward(h, x)
        return x + self.mlp(normed)


# HF names of separate projections -> (our fused parameter, shard index)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = rotary
        self.fused_decoder: FusedDecoder | None = None  # see use_fused_decoder
        # an EAGLE proposer reads every row's last hidden state (before the final norm) after each forward
        self.keep_hidden_states = False
        self.last_hidden_states: torch.Tensor | None = None
        self.tie_weights()

    def use_fused_decoder(self, enabled: bool = True) -> bool:
        """Run decode-sized steps' decoder layers as one C++ call where the layers allow it (models/fused_decode.py);
        call once the weights are loaded and in place. Returns whether it is on. Off by default: code that hooks
        into the layers (calibration, activation statistics) needs each layer's own forward."""
        self.fused_decoder = FusedDecoder.for_model(self) if enabled else None
        return self.fused_decoder is not None

    def tie_weights(self) -> None:
        """Share the embedding with the lm_head when the model ties them; moving modules can untie them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of the rows in `logits_indices` (all rows if None): only sampled positions pay for the lm_head,
        and they pay for it in fp32 (fp32_logits.py)."""
        x = self.embed_tokens(input_ids)
        if self.fused_decoder is not None and self.fused_decoder.applies(x, kv_caches):
            x = self.fused_decoder.forward(x, positions, meta)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(x, positions, kv_cache, meta)
        if self.keep_hidden_states:
            self.last_hidden_states = x
        if logits_indices is not None:
            x = x[logits_indices]
        return sampled_logits(self.norm, self.lm_head, x)

    def kernel_switch_rows(self, dtype: torch.dtype) -> tuple[list[int], list[int]]:
        """Row counts at which a linear layer changes kernel (GEMV below, GEMM from there on; see gemm_dispatch and
        dense_linear), whose accumulation order differs: (the decoder's, seen by a step's token count; the lm_head's,
        seen by its sampled rows). A step that adds rows without crossing any of them computes every row as
        before, bit for bit: what speculative verification keeps to."""
        def switches(module: nn.Module, x_dtype: torch.dtype) -> list[int]:
            if isinstance(module, QuantLinear):
                return module.kernel_switch_rows(x_dtype)
            if (isinstance(module, Linear) and module.use_gemv and module.weight.dtype == torch.float32
                    and x_dtype == torch.float32 and module.weight.device.type == "cpu"):
                return [DENSE_GEMV_MAX_ROWS + 1]
            return []
        decoder = sorted({r for layer in self.layers for m in layer.modules() for r in switches(m, dtype)})
        head_dtype = torch.float32 if runs_in_fp32(self.lm_head) else dtype
        return decoder, sorted(set(switches(self.lm_head, head_dtype)))

    def apply_quantization(self, scheme, lm_head_scheme=None) -> None:
        """Swap the decoder's projections (and, with `lm_head_scheme`, the untied lm_head) for empty quantized
        layers (`pernode.shrink.QuantScheme`s), before `load_weights` fills them from a quantized checkpoint
        (weight_packed / weight, weight_scale, ...)."""
        replace_linears(self, scheme)
        if lm_head_scheme is not None:
            if self.config.tie_word_embeddings:
                raise ValueError("a quantized lm_head needs tie_word_embeddings=false in config.json")
            self.lm_head = make_quantized_linear(self.lm_head, lm_head_scheme, "lm_head")

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up as they arrive (quantized tensors fuse along rows too)."""
        params = dict(self.named_parameters())
        params.update((n, b) for n, b in self.named_buffers() if n.rsplit(".", 1)[-1].startswith("weight"))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or name.endswith(".weight_shape"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            fused = FUSED_PROJECTIONS.get(parts[-2]) if len(parts) >= 2 else None
            if fused is not None:
                target_name = ".".join(parts[:-2] + [fused[0], parts[-1]])
                target = params[target_name]
                offset, size = self._shard_range(fused[0], fused[1])
                shard = target.data[offset:offset + size]
                if shard.shape != tensor.shape:  # copy_ would broadcast a wrong shape silently
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(shard.shape)}")
                shard.copy_(tensor)
                loaded.add(f"{target_name}#{fused[1]}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        expected = set()
        for name in params:
            owner = name.split(".")[-2] if "." in name else ""
            if owner == "qkv_proj":
                expected |= {f"{name}#{i}" for i in range(3)}
            elif owner == "gate_up_proj":
                expected |= {f"{name}#{i}" for i in range(2)}
            elif not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
        for module in self.modules():
            if hasattr(module, "post_load"):  # quantized layers derive their kernel's operands
                module.post_load()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in Hugging Face naming, q/k/v and gate/up split again: what checkpoints are saved as."""
        out = {}
        for name, param in self.named_parameters():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            fused = parts[-2] if len(parts) >= 2 else ""
            if fused in ("qkv_proj", "gate_up_proj"):
                for hf_name, (target, shard) in FUSED_PROJECTIONS.items():
                    if target == fused:
                        offset, size = self._shard_range(fused, shard)
                        key = ".".join(["model"] + parts[:-2] + [hf_name, parts[-1]])
                        out[key] = param.data[offset:offset + size].contiguous()
                continue
            out[name if name.startswith("lm_head") else f"model.{name}"] = param.data.contiguous()
        return out

    def _shard_range(self, fused_name: str, shard: int) -> tuple[int, int]:
        c = self.config
        if fused_name == "qkv_proj":
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            return [(0, q), (q, kv), (q + kv, kv)][shard]
        return shard * c.intermediate_size, c.intermediate_size
