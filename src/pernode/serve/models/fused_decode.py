"""A decode-sized step's decoder layers as one C++ call (kernels/csrc/decoder_stack.cpp) instead of ~25 Python-level
ops per layer: the same kernels in the same order, so the same numbers, without the per-op module calls, argument
parsing and dispatch that cost ~130 us a layer at batch 1.

One difference by design: a decode step here (no sequence with more than 8 query tokens: decodes, speculative
verification) runs each int4 projection's int8-x kernels (the GEMV, from its measured crossover the panel kernel,
csrc/int4_panel_gemm.h) up to its `decode_int8_max_rows`, measured faster there than the GEMM with float x (or, where
int8 x is capped at 8 rows, AVX2 without VNNI, than float x at all). A prompt chunk of more than 8 tokens keeps
float x: the GEMM, even below the measured GEMV crossover where VNNI's GEMV would quantize x (int8 activations in a
37-token chat prompt flip the default model's near-tie answer to "What is the capital of France?"). The per-op
layers, which serve steps only under --compile, on CUDA or with a quantized KV cache, choose by rows alone.

`FusedDecoder.for_model` says once whether a model's layers are all of a kind the op runs (int4/int8 weight-only
or float projections on CPU, the C++ layer ops and attention kernel); `applies` says per step whether this step
is one (at most 64 rows, plain float K/V caches, no autograd). Everything else (prefill chunks, large batches, CUDA,
sparse or W8A8 projections, quantized K/V caches) stays on the per-op path in models/llama.py, the reference.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from pernode import envs
from pernode.envs import KernelChoice
from pernode.serve.kernels import decoder_stack, layer_ops, paged_attention_cpu
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.dense_linear import Linear
from pernode.serve.kernels.quant_linear import FLOAT_GEMV_MAX_ROWS, PANEL_MAX_ROWS, QuantLinear

log = logging.getLogger("pernode.serve.models")

# Rows a step may have to run fused: decode batches up to 64 sequences (at 32 the fused step measured 12% less CPU
# time than the per-op one, docs/benchmarks.md); prefill-sized steps stay on the per-op layers, where dispatch is noise.
MAX_ROWS = 64
DTYPES = (torch.float32, torch.bfloat16)


def _projection_kind(module: nn.Module) -> str | None:
    if type(module) is QuantLinear:
        return "quantized" if module._op is not None else None
    if type(module) is Linear:
        return "float"
    return None


class FusedDecoder:
    """The operands of `torch.ops.pernode.decoder_stack` for one model, laid out once per (dtype, K/V caches)."""

    def __init__(self, model: nn.Module, op):
        self.model, self.op = model, op
        c = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps, self.attn_scale = float(c.rms_norm_eps), c.head_dim ** -0.5
        self.num_threads = envs.quant_threads()
        self._weights: dict[tuple[torch.dtype, int, bool], tuple] = {}  # (dtype, rows up to a cap + 1, decode)
        self._decode_rows: dict[torch.dtype, int] = {}
        self._kv_source: list | None = None
        self._kv_flat: list[torch.Tensor] = []

    @classmethod
    def for_model(cls, model: nn.Module) -> FusedDecoder | None:
        """A FusedDecoder if every decoder layer is of a kind the op runs, else None (and a debug line why)."""
        reason = cls._unsupported(model)
        if reason is None:
            op = decoder_stack.load_kernel()
            if op is not None:
                return cls(model, op)
            reason = "the decoder_stack kernel did not build"
        log.debug("fused decode off: %s", reason)
        return None

    @staticmethod
    def _unsupported(model: nn.Module) -> str | None:
        if envs.fused_decode_kernel() is KernelChoice.REFERENCE:
            return "PERNODE_FUSED_DECODE=reference"
        if next(model.parameters()).device.type != "cpu":
            return "not on CPU"
        if not layer_ops.native_by_default() or envs.attention_kernel() is KernelChoice.REFERENCE:
            return "the layer ops or the attention kernel are set to reference"
        if model.config.head_dim % 16 or model.config.head_dim > 512:
            return f"head_dim {model.config.head_dim} is not one the attention kernel takes"
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.force_reference or not (layer.input_layernorm.native and attn.rotary.native):
                return f"layer {i} uses reference kernels"
            if (attn.num_heads, attn.num_kv_heads, attn.head_dim) != (model.config.num_attention_heads,
                                                                       model.config.num_key_value_heads,
                                                                       model.config.head_dim):
                return f"layer {i} has its own head layout"
            for name, proj in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                               ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
                if _projection_kind(proj) is None:
                    return f"layer {i}'s {name} is a {type(proj).__name__}"
        return None

    def applies(self, x: torch.Tensor, kv_caches) -> bool:
        """Whether this step runs fused: a few rows on CPU in fp32/bf16, plain float K/V caches, no autograd."""
        if not (0 < x.shape[0] <= MAX_ROWS and x.dtype in DTYPES and x.dtype == self.model.norm.weight.dtype
                and x.device.type == "cpu"):
            return False
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # the op has no autograd formula
            return False
        if kv_caches is not self._kv_source:
            self._kv_flat = self._flatten_caches(x, kv_caches)
            self._kv_source = kv_caches
        return bool(self._kv_flat)

    def _flatten_caches(self, x: torch.Tensor, kv_caches) -> list[torch.Tensor]:
        flat = [t for pair in kv_caches for t in pair]
        if len(flat) != 2 * len(self.model.layers):
            return []
        plain = all(isinstance(t, torch.Tensor) and t.dtype in paged_attention_cpu.SUPPORTED_DTYPES
                    and t.device.type == "cpu" and t.is_contiguous() for t in flat)
        return flat if plain else []

    def _operands(self, dtype: torch.dtype, rows: int, decode: bool) -> tuple:
        # Where int8 x is capped (AVX2), the cap is FLOAT_GEMV_MAX_ROWS (quant_linear.int8_input_max_rows): one layout
        # per row count up to it and one beyond. Decode steps keep the int8-x kernels further, up to each projection's
        # own row count (QuantLinear.decode_int8_max_rows): one layout per row count up to the largest of those.
        last = self._decode_int8_rows(dtype) if decode else FLOAT_GEMV_MAX_ROWS
        key = (dtype, min(rows, last + 1), decode)
        operands = self._weights.get(key)
        if operands is None:
            operands = self._weights[key] = self._lay_out(*key)
        return operands

    def _decode_int8_rows(self, dtype: torch.dtype) -> int:
        """The most rows at which any projection's decode steps still run the int8-x kernels, at least
        FLOAT_GEMV_MAX_ROWS."""
        rows = self._decode_rows.get(dtype)
        if rows is None:
            finite = [m.decode_int8_max_rows(dtype) for m in self.model.layers.modules() if type(m) is QuantLinear]
            rows = self._decode_rows[dtype] = max([r for r in finite if r < PANEL_MAX_ROWS + 1]
                                                  + [FLOAT_GEMV_MAX_ROWS])
        return rows

    def _lay_out(self, dtype: torch.dtype, rows: int, decode: bool) -> tuple:
        norms, weights, scales, zero_terms, biases, config = [], [], [], [], [], []
        for layer in self.model.layers:
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                         layer.mlp.down_proj):
                biases.append(proj.bias)
                if type(proj) is QuantLinear:
                    s = proj.scheme
                    weights.append(proj.qweight)
                    int8_x, gemm_rows = proj.step_kernels(dtype, rows, decode)
                    args = proj.gemv_args(rows, int8_x)  # the GEMV's own qparams (fp16 for int8 x where exact)
                    scales.append(args[1])
                    zero_terms.append(args[2])
                    flags = ((decoder_stack.INT8_INPUT if int8_x else 0)
                             | (decoder_stack.INT16_GEMM if proj.gemm_takes_int16 else 0))
                    config += [s.num_bits, s.group_size or 0, flags, gemm_rows, proj.panel_from_rows(dtype)]
                else:
                    weights.append(proj.weight)
                    scales.append(None)
                    zero_terms.append(None)
                    config += [0, 0, decoder_stack.DENSE_GEMV if proj.use_gemv else 0, 0, 0]
        return norms, weights, scales, zero_terms, biases, config

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states after the last decoder layer (before the final norm), K/V written as the layers would."""
        decode = meta.max_query_len <= FLOAT_GEMV_MAX_ROWS  # decodes and verification, no prompt chunk
        norms, weights, scales, zero_terms, biases, config = self._operands(x.dtype, x.shape[0], decode)
        rotary = self.model.rotary
        int32 = torch.int32  # as AttentionMetadata.build makes them (a no-op then); the kernel takes only int32
        return self.op(x, positions, rotary.cos, rotary.sin, meta.slot_mapping, meta.block_tables.to(int32),
                       meta.query_start_loc.to(int32), meta.seq_lens.to(int32), norms, weights, scales, zero_terms, biases, config,
                       self._kv_flat, self.num_heads, self.num_kv_heads, self.head_dim, self.eps, self.attn_scale,
                       self.num_threads)
