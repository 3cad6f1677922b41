"""A local Hugging Face model folder: config.json, *.safetensors, tokenizer.json (+ tokenizer_config.json).

Weights load from safetensors only: pickled checkpoints (pytorch_model.bin) can run code when loaded. The folder is
untrusted input too: the index's weight_map may name only files inside the folder, and a tensor stored in two shards
is an error rather than one silently overwriting the other.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from pernode.config import ModelConfig

# architectures entry of config.json -> ModelConfig.architecture
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_PICKLED_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some older checkpoints saved alongside the weights; recomputed from the config.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFFolder:
    """config.json + safetensors weights of a Llama, Mistral or Qwen2 causal LM."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{self.path}: no config.json; an HF model folder needs config.json and *.safetensors")
        self.config_json = _read_json(config_path)
        architectures = self.config_json.get("architectures") or []
        supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ValueError(
                f"{config_path}: architectures is {architectures}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        self.architecture = SUPPORTED_ARCHITECTURES[supported[0]]
        self.weight_files = self._find_weight_files()
        self._tensor_files = self._index_tensors()  # tensor name -> the one file holding it (headers only)

    def _find_weight_files(self) -> list[str]:
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: weight_map is {weight_map!r}; expected {{tensor name: file name}}")
            for tensor, name in weight_map.items():
                self._check_shard_name(index_path, tensor, name)
            return [os.path.join(self.path, name) for name in sorted(set(weight_map.values()))]
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if files:
            return files
        pickled = sorted(os.path.basename(p) for pattern in _PICKLED_PATTERNS
                         for p in glob.glob(os.path.join(self.path, pattern)))
        if pickled:
            raise ValueError(
                f"{self.path}: only pickled weights ({', '.join(pickled)}); pickled weights are refused because "
                "loading them can run arbitrary code. Convert them to safetensors (model.save_pretrained(folder, "
                "safe_serialization=True) in a trusted environment) or download the repo's *.safetensors."
            )
        raise ValueError(f"{self.path}: no *.safetensors weight files")

    def _check_shard_name(self, index_path: str, tensor: str, name: object) -> None:
        """A weight_map entry must be a relative path to a .safetensors file inside the folder (no `..`, not
        absolute): a checkpoint must not make the loader read files elsewhere on the machine."""
        parts = os.path.normpath(name).split(os.sep) if isinstance(name, str) and name else []
        if (not parts or os.path.isabs(name) or ".." in parts or "\0" in name
                or not name.endswith(".safetensors")):
            raise ValueError(f"{index_path}: weight_map[{tensor!r}] = {json.dumps(name)} is not allowed: allowed a "
                             "relative path to a .safetensors file inside the model folder")

    def _index_tensors(self) -> dict[str, str]:
        """Which file holds each tensor, from the safetensors headers; ValueError naming a tensor in two files."""
        where: dict[str, str] = {}
        for path in self.weight_files:
            if not os.path.isfile(path):
                raise ValueError(f"{self.path}: weight file {os.path.relpath(path, self.path)} is missing")
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in where:
                        raise ValueError(
                            f"{self.path}: tensor {name!r} is in both {os.path.relpath(where[name], self.path)} and "
                            f"{os.path.relpath(path, self.path)}; a tensor must be stored once"
                        )
                    where[name] = path
        return where

    @property
    def quantization_config(self) -> dict | None:
        """config.json's `quantization_config` (compressed-tensors layout) when the weights are quantized."""
        return self.config_json.get("quantization_config")

    def model_config(self) -> ModelConfig:
        """ModelConfig from config.json (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        cfg = self.config_json

        def required(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(
                    f"{self.path}/config.json: field {key!r} is missing; it is required for {self.architecture}"
                )
            return cfg[key]

        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{self.path}/config.json: hidden_act is {cfg['hidden_act']!r}; only 'silu' is supported")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{self.path}/config.json: mlp_bias is true; MLP biases are not supported")
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = dict(cfg.get("rope_scaling") or rope)
        if "type" in scaling:  # older spelling
            scaling.setdefault("rope_type", scaling.pop("type"))
        num_heads = int(required("num_attention_heads"))
        hidden_size = int(required("hidden_size"))
        max_positions = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window")
        if self.architecture == "mistral" and window:
            # Attention here is full; up to the window it equals Mistral's sliding-window attention.
            max_positions = min(max_positions, int(window))
        generation_config_path = os.path.join(self.path, "generation_config.json")
        generation = _read_json(generation_config_path) if os.path.isfile(generation_config_path) else {}
        eos_ids = _as_id_list(generation.get("eos_token_id", cfg.get("eos_token_id")))
        bos = generation.get("bos_token_id", cfg.get("bos_token_id"))
        return ModelConfig(
            vocab_size=int(required("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling if scaling.get("rope_type", "default") != "default" else None,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them when attention_bias says so.
            attention_bias=self.architecture == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            architecture=self.architecture,
            name=os.path.basename(os.path.normpath(self.path)),
        )

    def iter_tensors(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) one at a time, read from the memory-mapped safetensors files."""
        for path in self.weight_files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(_SKIPPED_SUFFIXES):
                        continue
                    tensor = f.get_tensor(name)
                    # Quantized checkpoints' integer tensors (packed weights, zero points, shapes) keep their dtype.
                    target = dtype if tensor.is_floating_point() else tensor.dtype
                    yield name, tensor.to(device=device, dtype=target)
