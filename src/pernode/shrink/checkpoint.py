"""Quantized checkpoints: safetensors + config.json whose `quantization_config` follows compressed-tensors.

Per quantized HF linear (q/k/v/o/gate/up/down_proj): `weight_packed` (int4, 8 per int32 along the input dim, stored
q + 8) or `weight` (int8), `weight_scale` [out, groups], `weight_zero_point` [out, groups] (asymmetric only) and
`weight_shape` ([out, in], int64). Embeddings and norms stay float; so does the lm_head (`ignore: ["lm_head"]`)
unless quantized on request (a second config group targeting "lm_head", tie_word_embeddings false).
W8A8 checkpoints add `input_activations` (dynamic per-token int8); LLM.int8() adds the non-standard
`outlier_threshold` there. `pernode_recipe` records the `Recipe` that wrote the folder (`Recipe.from_dict` reads it).

This module only writes; `pernode.serve.models.loader.load_model` loads (what the engine serves), and
`pernode.quant_format` translates between `quantization_config` and `QuantScheme` for both.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from pernode.quant_format import quantization_config_from_scheme
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.kernels.w8a8_linear import W8A8Linear
from pernode.serve.models.llama import FUSED_PROJECTIONS, LlamaForCausalLM
from pernode.shrink.recipes import Recipe
from pernode.sparse_format import SparseFormat, compress_24_bitmask, compress_bitmask, sparsity_config

SPARSE_FORMAT_VERSION = "0.11.0"  # the compressed-tensors release whose sparse layouts these follow
FUSED_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def quantized_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF-named tensors of a model whose projections may be quantized; fused layers split by rows again."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.hf_state_dict().items():
        out[name] = tensor  # float parameters (quantized layers contribute only their biases here)
    for mod_name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, W8A8Linear)):
            continue
        out.pop(f"model.{mod_name}.weight", None)
        tensors = {"weight_packed" if module.scheme.num_bits == 4 else "weight": module.qweight
                   if isinstance(module, QuantLinear) else module.weight,
                   "weight_scale": module.weight_scale}
        if module.weight_zero_point is not None:
            tensors["weight_zero_point"] = module.weight_zero_point
        parts = mod_name.split(".")
        shards = [(hf, shard) for hf, (fused, shard) in FUSED_PROJECTIONS.items() if fused == parts[-1]]
        for hf_name, shard in shards or [(parts[-1], None)]:
            rows = model._shard_range(parts[-1], shard) if shard is not None else (0, module.out_features)
            key = ".".join(([] if parts[0] == "lm_head" else ["model"]) + parts[:-1] + [hf_name])
            for suffix, t in tensors.items():
                out[f"{key}.{suffix}"] = t[rows[0]:rows[0] + rows[1]].contiguous()
            out[f"{key}.weight_shape"] = torch.tensor([rows[1], module.in_features], dtype=torch.int64)
    return out


def _hf_config_json(config) -> dict:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {
        "architectures": [arch[config.architecture]], "model_type": config.architecture,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids, "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def save_quantized(model: LlamaForCausalLM, source, folder: str, recipe: Recipe, details: dict | None = None) -> str:
    """Write `folder`: model.safetensors, config.json (+ quantization_config, which records `recipe` and the
    method's `details`) and the tokenizer files. `model` is what `recipe.apply` left; the checkpoint is loaded by
    `pernode.serve.models.loader.load_model`."""
    if recipe.is_float:
        raise ValueError(f"recipe {recipe.name!r} quantizes nothing: there is no quantized checkpoint to write")
    scheme = recipe.scheme
    os.makedirs(folder, exist_ok=True)
    thresholds = {m.outlier_threshold for m in model.modules() if isinstance(m, W8A8Linear)} - {None}
    if thresholds:  # LLM.int8(): the layers, not the caller's scheme, know the outlier threshold
        scheme = dataclasses.replace(scheme, outlier_threshold=thresholds.pop())
    tensors = quantized_state_dict(model)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = _config_and_tokenizer(source, folder)
    cfg["tie_word_embeddings"] = model.config.tie_word_embeddings  # a quantized lm_head is untied
    qc = quantization_config_from_scheme(scheme, recipe.method, getattr(model.lm_head, "scheme", None))
    qc["config_groups"]["group_0"]["weights"]["observer"] = recipe.modifier.weight_observer()
    qc["pernode_recipe"] = recipe.to_dict()
    if details:
        qc["pernode_details"] = details
    if recipe.pruner is not None:  # the zeros are stored as quantized values; the config says the layers are sparse
        qc["sparsity_config"] = sparsity_config(SparseFormat.DENSE, decoder_sparsity(model),
                                                recipe.pruner.sparsity_pattern)
    cfg["quantization_config"] = qc
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    return folder


def _config_and_tokenizer(source, folder: str) -> dict:
    """The source's config.json as a dict, with the tokenizer files written into `folder`."""
    if source.format == "hf":
        with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source.path, name)):
                shutil.copy(os.path.join(source.path, name), os.path.join(folder, name))
    else:  # GGUF: config and tokenizer come from its metadata
        cfg = _hf_config_json(source.config)
        tok = source.tokenizer
        tok.backend.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}, f)
    return cfg


def _sparse_projection_weights(model: LlamaForCausalLM) -> list[str]:
    """HF names of the decoder projections' float weights (what a sparse checkpoint compresses)."""
    names = []
    for i in range(model.config.num_hidden_layers):
        for hf_name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"model.layers.{i}.self_attn.{hf_name}.weight")
        for hf_name in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"model.layers.{i}.mlp.{hf_name}.weight")
    return names


def decoder_sparsity(model: LlamaForCausalLM) -> float:
    """Fraction of zeros over the decoder projections (float or quantized; a quantized zero dequantizes to 0)."""
    zeros = total = 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr in FUSED_LAYER_NAMES:
                module = getattr(parent, attr, None)
                if module is None:
                    continue
                w = module.weight if isinstance(module, torch.nn.Linear) else module.dequantized_weight()
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / max(total, 1)


def save_sparse(model: LlamaForCausalLM, source, folder: str, recipe: Recipe, details: dict | None = None) -> str:
    """Write a pruned float model as compressed-tensors' sparse-bitmask (sparse-24-bitmask for a 2:4 pattern)
    checkpoint: model.safetensors with each decoder projection as its nonzeros + bitmask, config.json with a
    `sparsity_config` (and the recipe under `pernode_recipe`, beside it: compressed-tensors reads every other key
    of quantization_config as a quantization scheme), tokenizer files. Loaded by `load_model` like any other."""
    if recipe.pruner is None or not recipe.is_float:
        raise ValueError(f"recipe {recipe.name!r}: save_sparse writes pruned float models (a pruner, no quantizer); "
                         "quantized ones go through save_quantized")
    pattern = recipe.pruner.sparsity_pattern
    fmt = SparseFormat.BITMASK_24 if (pattern.n, pattern.m) == (2, 4) else SparseFormat.BITMASK
    compress = compress_24_bitmask if fmt is SparseFormat.BITMASK_24 else compress_bitmask
    os.makedirs(folder, exist_ok=True)
    tensors = model.hf_state_dict()
    for name in _sparse_projection_weights(model):
        prefix = name.removesuffix(".weight")
        for suffix, t in compress(tensors.pop(name)).items():
            tensors[f"{prefix}.{suffix}"] = t
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = _config_and_tokenizer(source, folder)
    cfg["tie_word_embeddings"] = model.config.tie_word_embeddings
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": SPARSE_FORMAT_VERSION,
                                  "sparsity_config": sparsity_config(fmt, decoder_sparsity(model), pattern)}
    cfg["pernode_recipe"] = recipe.to_dict()
    if details:
        cfg["pernode_details"] = details
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    return folder


def save_checkpoint(model: LlamaForCausalLM, source, folder: str, recipe: Recipe, details: dict | None = None) -> str:
    """The checkpoint `recipe` calls for: quantized (sparse or not) by `save_quantized`, pruned float by
    `save_sparse`."""
    if recipe.is_float and recipe.pruner is not None:
        return save_sparse(model, source, folder, recipe, details)
    return save_quantized(model, source, folder, recipe, details)


def checkpoint_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))
