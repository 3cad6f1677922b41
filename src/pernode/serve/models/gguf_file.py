"""One GGUF file (llama.cpp's format): its config, and its tensors under Hugging Face Llama names, dequantized or
(for the weights named in `native`) repacked at their own precision by gguf_native.py.

The file is memory-mapped; tensors are converted one at a time, so a load never holds two full copies.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType

from pernode.config import ModelConfig
from pernode.quant_format import QuantScheme
from pernode.serve.models.gguf_header import validate_gguf_header
from pernode.serve.models.gguf_native import native_scheme, repack

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # Mistral GGUFs are written as "llama"

# gguf.quants.dequantize (numpy) decodes all of these; the whole 135M default model takes ~1.5 s.
SUPPORTED_TENSOR_TYPES = (
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K,
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors that carry config, not weights: read into ModelConfig.rope_scaling instead.
_CONFIG_TENSORS = {"rope_freqs.weight"}
# GGUF `{arch}.rope.scaling.*` suffix -> HF rope_scaling key.
_ROPE_SCALING_KEYS = {
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_MISSING = object()
_MAX_METADATA_INT = 2**31 - 1  # shapes, counts and token ids are int32 in llama.cpp


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a GGUF tensor; ValueError for one with no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Llama/Qwen2 counterpart; expected one of "
        f"{sorted(_GLOBAL_NAMES)} or blk.N.{{{', '.join(sorted(_LAYER_NAMES))}}}"
    )


def dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy in numpy/PyTorch dimension order ([out, in] for a weight)."""
    qtype = GGMLType(tensor.tensor_type)
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {qtype.name}; supported types: "
            f"{', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}. Convert or re-quantize the file to one of them."
        )
    values = gguf.quants.dequantize(tensor.data, qtype)
    # GGUF lists dimensions innermost first, the reverse of numpy.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = values.reshape(shape)
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    elif not values.flags.writeable:  # a view into the read-only memory map
        values = values.copy()
    return values


def unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves (x_i, x_{i+d/2}).
    The converter reorders each head's rows from halves to pairs; this puts them back. Same formula as
    transformers' `_reverse_permute_weights`. Works for a weight [out, in] and for a bias [out].
    """
    half_head_dim = weight.shape[0] // num_heads // 2
    pairs = weight.reshape(num_heads, half_head_dim, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def llama3_freq_factors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes as `rope_freqs.weight` for a llama3 rope_scaling (divisors of inv_freq)."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))


class GGUFFile:
    """A memory-mapped GGUF of a supported architecture."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        validate_gguf_header(self.path)  # GGUFReader checks no bounds: a crafted file could exhaust memory
        self.reader = gguf.GGUFReader(self.path, "r")
        self.architecture = self.metadata("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path}: general.architecture is {self.architecture!r}; supported architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral files are 'llama')."
            )
        if self.metadata(f"{self.architecture}.expert_count", 0):
            raise ValueError(
                f"{self.path}: {self.architecture}.expert_count is "
                f"{self.metadata(f'{self.architecture}.expert_count')}; mixture-of-experts models are not supported."
            )
        self._tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value (scalar, str or list); ValueError naming the key when absent without a default."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def int_metadata(self, key: str, default: Any = _MISSING, minimum: int = 1) -> Any:
        """An integer metadata value >= `minimum` (a whole float is accepted); ValueError naming the key if not."""
        value = self.metadata(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_METADATA_INT:
            raise ValueError(f"{self.path}: GGUF metadata {key} = {value!r} is out of range: allowed an integer in "
                             f"{minimum}..{_MAX_METADATA_INT}")
        return value

    def model_config(self) -> ModelConfig:
        """Shapes from `{arch}.*` metadata; name is the file name, eos is the tokenizer's eos only."""
        arch = self.architecture

        def key(name: str, default: Any = _MISSING) -> Any:
            return self.metadata(f"{arch}.{name}", default)

        def int_key(name: str, default: Any = _MISSING) -> Any:
            return self.int_metadata(f"{arch}.{name}", default)

        def float32_key(name: str, default: float) -> float:
            # Stored as float32: 1e-5 reads back as 9.9999997e-06; keep the shortest decimal that round-trips.
            return float(str(np.float32(key(name, default))))

        num_heads = int_key("attention.head_count")
        hidden_size = int_key("embedding_length")
        head_dim = int_key("attention.key_length", None) or int_key("rope.dimension_count", None)
        head_dim = int(head_dim or hidden_size // num_heads)
        rope_theta = float32_key("rope.freq_base", 10000.0)
        vocab_size = int_key("vocab_size", None)
        if vocab_size is None:
            tokens = self.metadata("tokenizer.ggml.tokens")
            if not isinstance(tokens, list) or not tokens:
                raise ValueError(f"{self.path}: GGUF metadata tokenizer.ggml.tokens is not a list of tokens")
            vocab_size = len(tokens)
        eos = self.int_metadata("tokenizer.ggml.eos_token_id", None, minimum=0)
        return ModelConfig(
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=int_key("feed_forward_length"),
            num_hidden_layers=int_key("block_count"),
            num_attention_heads=num_heads,
            num_key_value_heads=int_key("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rms_norm_eps=float32_key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=self._rope_scaling(rope_theta, head_dim),
            max_position_embeddings=int_key("context_length", 2048),
            # llama.cpp writes output.weight only when it differs from the embedding.
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            bos_token_id=self.int_metadata("tokenizer.ggml.bos_token_id", None, minimum=0),
            eos_token_ids=[int(eos)] if eos is not None else [],
            architecture=arch,
            name=os.path.splitext(os.path.basename(self.path))[0],
        )

    def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict | None:
        """HF-style rope_scaling from `{arch}.rope.scaling.*` or from the `rope_freqs.weight` tensor.

        Llama 3.x GGUFs carry no scaling metadata: the converter bakes the llama3 schedule into
        `rope_freqs.weight` (inv_freq is divided by it). We recover the llama3 parameters when Llama 3's
        constants reproduce those divisors, and otherwise pass the divisors on as they are.
        """
        prefix = f"{self.architecture}.rope.scaling."
        fields = {k[len(prefix):]: self.metadata(k) for k in self.reader.fields if k.startswith(prefix)}
        rope_type = fields.pop("type", None)
        if rope_type is None and self.metadata(f"{self.architecture}.rope.scale_linear", None):
            rope_type, fields["factor"] = "linear", self.metadata(f"{self.architecture}.rope.scale_linear")
        if "rope_freqs.weight" in self._tensors:
            freq_factors = dequantize(self._tensors["rope_freqs.weight"]).reshape(-1)
            llama3 = {"rope_type": "llama3", "factor": float(freq_factors.max()), "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            if np.allclose(llama3_freq_factors(llama3, rope_theta, head_dim), freq_factors, rtol=1e-4):
                return llama3
            return {"rope_type": "freq_factors", "freq_factors": freq_factors.tolist()}
        if rope_type in (None, "none"):
            return None
        scaling = {"rope_type": rope_type}
        for key, value in fields.items():
            scaling[_ROPE_SCALING_KEYS.get(key, key)] = value
        return scaling

    def native_schemes(self) -> dict[str, QuantScheme]:
        """HF weight name -> the QuantScheme it can be served in unchanged, for every weight with a native form."""
        schemes = {}
        for gguf_name, tensor in self._tensors.items():
            scheme = native_scheme(tensor) if gguf_name not in _CONFIG_TENSORS else None
            if scheme is not None:
                schemes[hf_tensor_name(gguf_name)] = scheme
        return schemes

    def native_weight(self, hf_name: str, device: str | torch.device = "cpu"
                      ) -> tuple[QuantScheme, dict[str, torch.Tensor]] | None:
        """(scheme, repacked pieces named as QuantLinear's state dict) of one un-permuted weight (the embedding or
        lm_head), or None when it has no native form."""
        gguf_names = [g for g in self._tensors if g not in _CONFIG_TENSORS and hf_tensor_name(g) == hf_name]
        scheme = native_scheme(self._tensors[gguf_names[0]]) if gguf_names else None
        if scheme is None:
            return None
        pieces = repack(self._tensors[gguf_names[0]])
        return scheme, {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in pieces.items()}

    def iter_tensors(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        native: frozenset[str] | set[str] = frozenset(),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) one at a time, q/k un-permuted so they equal the HF checkpoint's. A weight named
        in `native` comes as its repacked pieces instead (`x.weight_packed` or `x.weight`, `x.weight_scale`,
        `x.weight_min`), rows un-permuted alike."""
        # Qwen2 uses NEOX-style rope in llama.cpp, so its converter leaves q/k alone.
        permuted = self.architecture == "llama"
        num_heads = self.int_metadata(f"{self.architecture}.attention.head_count")
        num_kv_heads = self.int_metadata(f"{self.architecture}.attention.head_count_kv", num_heads)
        for gguf_name, tensor in self._tensors.items():
            if gguf_name in _CONFIG_TENSORS:
                continue
            hf_name = hf_tensor_name(gguf_name)
            heads = None
            if permuted and ".attn_q." in gguf_name:
                heads = num_heads
            elif permuted and ".attn_k." in gguf_name:
                heads = num_kv_heads
            if hf_name in native:
                base = hf_name.removesuffix(".weight")
                for suffix, piece in repack(tensor).items():
                    if heads is not None:  # a row permutation: it moves packed rows and their scales alike
                        piece = unpermute_rope(piece, heads)
                    yield f"{base}.{suffix}", torch.from_numpy(np.ascontiguousarray(piece)).to(device=device)
                continue
            values = dequantize(tensor)
            if heads is not None:
                values = unpermute_rope(values, heads)
            yield hf_name, torch.from_numpy(values).to(device=device, dtype=dtype)
