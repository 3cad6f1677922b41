"""Roofline accounting: parameters, FLOPs and bytes of a decode step or a prefill, and what a measured time implies.

Williams, Waterman, Patterson, "Roofline: an insightful visual performance model" (CACM 2009). A step that moves
`bytes` and does `flops` cannot finish faster than max(bytes / bandwidth, flops / peak_flops); which term wins says
whether it is memory- or compute-bound. LLM decode at small batch reads every weight once per step for a few FLOPs
per byte, so it is memory-bound; batching raises FLOPs per byte until it crosses the ridge
peak_flops / bandwidth (the crossover batch size).

Conventions (all counts are exact integers, bytes are floats because quantized weights have fractional bytes):
- A multiply-add is 2 FLOPs. Norms, rotary embeddings, activations, softmax and residual adds are elementwise and
  left out (< 1% of the matmul FLOPs at any practical size).
- "Context length" L of a decoding sequence is the number of tokens its new token attends to, itself included.
- Activations are assumed to stay in cache or registers: bytes are weights + KV cache traffic only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from pernode.config import ModelConfig

# dtype names (torch's or short) -> bytes per element, and -> the peak-FLOPs key a matmul in that dtype runs at.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "int8": 1, "q8_0": 34 / 32, "q4_0": 18 / 32}
COMPUTE_KEY = {"float32": "fp32", "fp32": "fp32", "float16": "bf16", "fp16": "bf16", "bfloat16": "bf16",
               "bf16": "bf16", "float8": "fp8", "fp8": "fp8", "float8_e4m3fn": "fp8", "int8": "int8"}


def dtype_bytes(dtype: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: unknown; one of {', '.join(DTYPE_BYTES)}") from None


def compute_key(dtype: str) -> str:
    """Which peak a matmul in `dtype` runs at; weight-only quantized formats compute in bf16."""
    return COMPUTE_KEY.get(dtype, "bf16")


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a Llama-family decoder, by part.

    Per layer: q = hidden*q_dim, k = v = hidden*kv_dim, o = q_dim*hidden, MLP = 3*hidden*intermediate
    (gate, up, down), two RMSNorm weight vectors of `hidden`, and q/k/v biases when `attention_bias` (Qwen2).
    Outside the layers: the embedding (vocab*hidden), the final norm (hidden) and the LM head (vocab*hidden),
    which is the embedding itself when `tie_word_embeddings`, then counted once.
    """

    embedding: int
    lm_head: int  # 0 when tied: the embedding doubles as the LM head
    linear_per_layer: int  # weights of the matmuls in one layer (attention projections + MLP)
    other_per_layer: int  # norm weights and biases in one layer
    final_norm: int
    num_layers: int

    @property
    def linear(self) -> int:
        """Matmul weights in all layers: the `params_nonembedding` of the 2*N*tokens FLOP rule."""
        return self.num_layers * self.linear_per_layer

    @property
    def layers(self) -> int:
        return self.num_layers * (self.linear_per_layer + self.other_per_layer)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.layers + self.final_norm


def count_params(cfg: ModelConfig) -> ParamCount:
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    mlp = 3 * h * cfg.intermediate_size
    bias = (q_dim + 2 * kv_dim) if cfg.attention_bias else 0
    return ParamCount(embedding=cfg.vocab_size * h, lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
                      linear_per_layer=attn + mlp, other_per_layer=2 * h + bias, final_norm=h,
                      num_layers=cfg.num_hidden_layers)


def weight_bytes(cfg: ModelConfig, weight_bytes_per_param: float) -> float:
    """Bytes of all weights held in memory (a tied embedding stored once)."""
    return count_params(cfg).total * weight_bytes_per_param


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one forward step, by part."""

    flops_matmul: float  # the layers' projections and MLP
    flops_lm_head: float
    flops_attention: float  # QK^T and softmax(QK^T)V
    bytes_weights: float
    bytes_kv_read: float
    bytes_kv_write: float
    tokens: int  # tokens processed in the step (B for decode, P for prefill)

    @property
    def flops(self) -> float:
        return self.flops_matmul + self.flops_lm_head + self.flops_attention

    @property
    def bytes(self) -> float:
        return self.bytes_weights + self.bytes_kv_read + self.bytes_kv_write

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops, "bytes": self.bytes,
                "arithmetic_intensity": self.arithmetic_intensity}


def _weights_read_bytes(p: ParamCount, num_tokens: int, hidden: int, weight_bytes_per_param: float) -> float:
    # Every layer weight and the LM head matrix are streamed once per step. The LM head is `vocab*hidden`
    # whether or not it is tied (tied: the embedding table is read as the LM head). The embedding lookup reads
    # only one row per token, not the whole table.
    lm_head_matrix = p.embedding
    return (p.layers + p.final_norm + lm_head_matrix + num_tokens * hidden) * weight_bytes_per_param


def decode_step_cost(cfg: ModelConfig, context_lens: Sequence[int], weight_bytes_per_param: float = 2.0,
                     kv_bytes_per_element: float = 2.0) -> StepCost:
    """One decode step for B = len(context_lens) sequences, sequence i attending to L_i tokens (its new one included).

    FLOPs  = 2 * params_linear * B                      (layer matmuls, params_linear = ParamCount.linear)
           + 2 * vocab * hidden * B                     (LM head, one token per sequence)
           + 4 * num_layers * q_dim * sum_i L_i         (QK^T: 2*q_dim*L_i, PV: 2*q_dim*L_i, per layer)
    Bytes  = (layer params + final norm + vocab*hidden + B*hidden) * weight_bytes_per_param   (weights, once)
           + sum_i L_i * kv_bytes_per_token             (K and V read for every attended token)
           + B * kv_bytes_per_token                     (the new tokens' K and V written)
    with kv_bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * kv_bytes_per_element.
    """
    if not context_lens:
        raise ValueError("context_lens is empty: a decode step needs at least one sequence")
    if min(context_lens) < 1:
        raise ValueError(f"context_lens contains {min(context_lens)}: each must be >= 1 (the new token included)")
    p = count_params(cfg)
    b, q_dim = len(context_lens), cfg.num_attention_heads * cfg.head_dim
    kv_per_token = cfg.kv_bytes_per_token(1) * kv_bytes_per_element
    return StepCost(
        flops_matmul=2.0 * p.linear * b,
        flops_lm_head=2.0 * cfg.vocab_size * cfg.hidden_size * b,
        flops_attention=4.0 * cfg.num_hidden_layers * q_dim * sum(context_lens),
        bytes_weights=_weights_read_bytes(p, b, cfg.hidden_size, weight_bytes_per_param),
        bytes_kv_read=sum(context_lens) * kv_per_token,
        bytes_kv_write=b * kv_per_token,
        tokens=b,
    )


def prefill_cost(cfg: ModelConfig, prompt_len: int, weight_bytes_per_param: float = 2.0,
                 kv_bytes_per_element: float = 2.0, prefix_len: int = 0,
                 logits_for_all_tokens: bool = False) -> StepCost:
    """Prefill of P = `prompt_len` new tokens of one sequence after `prefix_len` already cached tokens.

    FLOPs  = 2 * params_linear * P
           + 2 * vocab * hidden * (1, or P with logits_for_all_tokens)    (a server needs only the last logits)
           + 4 * num_layers * q_dim * (P * prefix_len + P * (P + 1) / 2)  (causal: new token j attends to
                                                                           prefix_len + j keys, j = 1..P)
    Bytes  = weights once (as in decode, with P embedding rows)
           + (prefix_len + P) * kv_bytes_per_token read   (a lower bound: each K/V entry read once)
           + P * kv_bytes_per_token written
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len = {prompt_len}: must be >= 1 token")
    if prefix_len < 0:
        raise ValueError(f"prefix_len = {prefix_len}: must be >= 0 tokens")
    p = count_params(cfg)
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_per_token = cfg.kv_bytes_per_token(1) * kv_bytes_per_element
    attended = prompt_len * prefix_len + prompt_len * (prompt_len + 1) // 2
    return StepCost(
        flops_matmul=2.0 * p.linear * prompt_len,
        flops_lm_head=2.0 * cfg.vocab_size * cfg.hidden_size * (prompt_len if logits_for_all_tokens else 1),
        flops_attention=4.0 * cfg.num_hidden_layers * q_dim * attended,
        bytes_weights=_weights_read_bytes(p, prompt_len, cfg.hidden_size, weight_bytes_per_param),
        bytes_kv_read=(prefix_len + prompt_len) * kv_per_token,
        bytes_kv_write=prompt_len * kv_per_token,
        tokens=prompt_len,
    )


def ridge_intensity(peak_bandwidth_gbs: float, peak_flops: float) -> float:
    """FLOPs per byte at which the bandwidth roof meets the compute roof."""
    _check_peaks(peak_bandwidth_gbs, peak_flops)
    return peak_flops / (peak_bandwidth_gbs * 1e9)


def roofline_time_s(flops: float, bytes_moved: float, peak_bandwidth_gbs: float, peak_flops: float) -> float:
    """The fastest a step can run: max(bytes / bandwidth, flops / peak)."""
    _check_peaks(peak_bandwidth_gbs, peak_flops)
    return max(bytes_moved / (peak_bandwidth_gbs * 1e9), flops / peak_flops)


@dataclass(frozen=True)
class RooflinePoint:
    """A measured step placed on the roofline."""

    time_s: float
    flops: float
    bytes: float
    arithmetic_intensity: float  # FLOP/byte
    achieved_gbs: float
    achieved_flops: float  # FLOP/s
    bound: str  # "memory" | "compute": which roof is lower at this intensity
    fraction_of_peak: float  # of the bandwidth roof when memory-bound, of the compute roof when compute-bound
    roofline_time_s: float


def place_on_roofline(flops: float, bytes_moved: float, time_s: float, peak_bandwidth_gbs: float,
                      peak_flops: float) -> RooflinePoint:
    """Achieved GB/s and FLOP/s of a step that took `time_s`, and how close it came to the roof that binds it."""
    if not time_s > 0:
        raise ValueError(f"time_s = {time_s}: a measured step time must be > 0 seconds")
    intensity = flops / bytes_moved
    bound = "memory" if intensity < ridge_intensity(peak_bandwidth_gbs, peak_flops) else "compute"
    achieved_gbs, achieved_flops = bytes_moved / time_s / 1e9, flops / time_s
    fraction = achieved_gbs / peak_bandwidth_gbs if bound == "memory" else achieved_flops / peak_flops
    return RooflinePoint(time_s=time_s, flops=flops, bytes=bytes_moved, arithmetic_intensity=intensity,
                         achieved_gbs=achieved_gbs, achieved_flops=achieved_flops, bound=bound,
                         fraction_of_peak=fraction,
                         roofline_time_s=roofline_time_s(flops, bytes_moved, peak_bandwidth_gbs, peak_flops))


def crossover_batch_size(cfg: ModelConfig, context_len: int, peak_bandwidth_gbs: float, peak_flops: float,
                         weight_bytes_per_param: float = 2.0, kv_bytes_per_element: float = 2.0) -> int | None:
    """Smallest decode batch (all sequences at `context_len`) whose intensity reaches the ridge; None if none does.

    With every sequence at L, decode FLOPs = a*B and bytes = W + c*B, where
      a = 2*params_linear + 2*vocab*hidden + 4*num_layers*q_dim*L      (FLOPs per sequence)
      W = weights read once per step                                      (bytes shared by the batch)
      c = hidden*weight_bytes_per_param + (L + 1)*kv_bytes_per_token      (bytes per sequence)
    Intensity a*B/(W + c*B) rises toward a/c; it reaches the ridge r at B = r*W / (a - r*c) when a > r*c.
    Otherwise the KV traffic alone keeps decode memory-bound at this context length, and the answer is None.
    """
    if context_len < 1:
        raise ValueError(f"context_len = {context_len}: must be >= 1 token")
    r = ridge_intensity(peak_bandwidth_gbs, peak_flops)
    one = decode_step_cost(cfg, [context_len], weight_bytes_per_param, kv_bytes_per_element)
    p = count_params(cfg)
    a = one.flops
    w = _weights_read_bytes(p, 0, cfg.hidden_size, weight_bytes_per_param)
    c = one.bytes - w
    if a <= r * c:
        return None
    b = max(1, math.ceil(r * w / (a - r * c) - 1e-9))
    # Guard the float division: step until the exact cost says the ridge is reached.
    while decode_step_cost(cfg, [context_len] * b, weight_bytes_per_param,
                           kv_bytes_per_element).arithmetic_intensity < r:
        b += 1
    while b > 1 and decode_step_cost(cfg, [context_len] * (b - 1), weight_bytes_per_param,
                                     kv_bytes_per_element).arithmetic_intensity >= r:
        b -= 1
    return b


def _check_peaks(peak_bandwidth_gbs: float, peak_flops: float) -> None:
    if not peak_bandwidth_gbs > 0:
        raise ValueError(f"peak_bandwidth_gbs = {peak_bandwidth_gbs}: must be > 0 (measure it with "
                         f"pernode.measure.profile.hardware.measure_peaks or take it from a datasheet)")
    if not peak_flops > 0:
        raise ValueError(f"peak_flops = {peak_flops}: must be > 0 FLOP/s")
