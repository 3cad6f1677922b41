"""GGUF loading: dequantization of every supported type against plain block decoders, q/k un-permutation,
config from metadata, and the default model's tensors against transformers' own GGUF loader."""
from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from pernode.serve.models.gguf_file import GGUFFile, dequantize
from pernode.serve.models.registry import hf_tensor_names, resolve_model

# ---------------------------------------------------------------------------------------------------------------
# Plain block decoders, written from ggml's dequantize_row_* (ggml-quants.c), independent of gguf.quants.


def _f16(raw: np.ndarray) -> float:
    return float(raw[:2].copy().view(np.float16)[0])


def _ref_q8_0(block: np.ndarray) -> np.ndarray:
    return _f16(block[0:2]) * block[2:34].copy().view(np.int8).astype(np.float64)


def _ref_q4_0(block: np.ndarray) -> np.ndarray:
    qs = block[2:18].astype(np.int64)
    return _f16(block[0:2]) * (np.concatenate([qs & 0xF, qs >> 4]) - 8)


def _ref_q4_1(block: np.ndarray) -> np.ndarray:
    qs = block[4:20].astype(np.int64)
    return _f16(block[0:2]) * np.concatenate([qs & 0xF, qs >> 4]) + _f16(block[2:4])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    q = [int(v) for v in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144].astype(np.int64)
    out = []
    for chunk in range(4):  # 64 values per chunk: low nibbles with one scale, high nibbles with the next
        q = qs[32 * chunk:32 * chunk + 32]
        sc1, m1 = _scale_min_k4(2 * chunk, scales)
        sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
        out += [d * sc1 * (q & 0xF) - dmin * m1, d * sc2 * (q >> 4) - dmin * m2]
    return np.concatenate(out)


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh = block[0:128].astype(np.int64), block[128:192].astype(np.int64)
    sc, d = block[192:208].copy().view(np.int8).astype(np.int64), _f16(block[208:210])
    y = np.zeros(256)
    for half in range(2):
        l_ = np.arange(32)
        lo, hi, s = ql[64 * half:64 * half + 64], qh[32 * half:32 * half + 32], sc[8 * half:8 * half + 8]
        q1 = ((lo[l_] & 0xF) | (((hi >> 0) & 3) << 4)) - 32
        q2 = ((lo[l_ + 32] & 0xF) | (((hi >> 2) & 3) << 4)) - 32
        q3 = ((lo[l_] >> 4) | (((hi >> 4) & 3) << 4)) - 32
        q4 = ((lo[l_ + 32] >> 4) | (((hi >> 6) & 3) << 4)) - 32
        is_ = l_ // 16
        base = 128 * half
        y[base + l_] = d * s[is_] * q1
        y[base + 32 + l_] = d * s[is_ + 2] * q2
        y[base + 64 + l_] = d * s[is_ + 4] * q3
        y[base + 96 + l_] = d * s[is_ + 6] * q4
    return y


_REFERENCE = {T.Q8_0: _ref_q8_0, T.Q4_0: _ref_q4_0, T.Q4_1: _ref_q4_1, T.Q4_K: _ref_q4_k, T.Q6_K: _ref_q6_k}


def _ref_dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    """raw: uint8 [rows, bytes_per_row] -> float64 [rows, cols], block by block."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = [np.concatenate([_REFERENCE[qtype](row[i:i + type_size]) for i in range(0, row.size, type_size)])
            for row in raw]
    assert rows[0].size == raw.shape[1] // type_size * block_size
    return np.stack(rows)


def _write_gguf(path, tensors: dict, arch: str = "llama", **metadata) -> str:
    """tensors: name -> float array (F32/F16) or (uint8 raw bytes [rows, bytes_per_row], qtype)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _read_tensor(path: str, name: str):
    reader = gguf.GGUFReader(path)
    return next(t for t in reader.tensors if t.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Dequantization, one test per type


ROWS, COLS = 3, 512  # not square, so a transposed result cannot pass


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (ROWS, COLS)).astype(np.float32)


def test_f32_is_exact(tmp_path, weights):
    path = _write_gguf(tmp_path / "f32.gguf", {"w": weights})
    out = dequantize(_read_tensor(path, "w"))
    assert out.shape == (ROWS, COLS) and out.dtype == np.float32
    np.testing.assert_array_equal(out, weights)
    out[0, 0] = 1.0  # a copy, not a view into the read-only map


def test_f16(tmp_path, weights):
    path = _write_gguf(tmp_path / "f16.gguf", {"w": weights.astype(np.float16)})
    out = dequantize(_read_tensor(path, "w"))
    np.testing.assert_array_equal(out, weights.astype(np.float16).astype(np.float32))


def test_bf16(tmp_path, weights):
    raw = gguf.quants.quantize(weights, T.BF16)
    path = _write_gguf(tmp_path / "bf16.gguf", {"w": (raw, T.BF16)})
    out = dequantize(_read_tensor(path, "w"))
    expected = torch.from_numpy(weights).to(torch.bfloat16).float().numpy()  # round-to-nearest-even, like ggml
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("qtype, max_error", [(T.Q8_0, 0.02), (T.Q4_0, 0.4), (T.Q4_1, 0.3)])
def test_block_quantized(tmp_path, weights, qtype, max_error):
    raw = gguf.quants.quantize(weights, qtype)
    path = _write_gguf(tmp_path / f"{qtype.name}.gguf", {"w": (raw, qtype)})
    out = dequantize(_read_tensor(path, "w"))
    assert out.shape == (ROWS, COLS)
    np.testing.assert_allclose(out, _ref_dequantize(raw, qtype), rtol=1e-6, atol=1e-6)
    assert np.abs(out - weights).max() < max_error  # and it is the tensor we wrote


def _random_k_blocks(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """gguf cannot quantize K types; random bytes are valid blocks once the f16 scales are finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (rows, cols // block_size, 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q4_K:  # d, dmin lead the block
        raw[..., 0:4] = scales.reshape(rows, -1, 4)
    else:  # Q6_K: d ends the block
        raw[..., 208:210] = scales.reshape(rows, -1, 4)[..., :2]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_k_quants_random_blocks(tmp_path, qtype):
    raw = _random_k_blocks(qtype, ROWS, COLS, seed=1)
    path = _write_gguf(tmp_path / f"{qtype.name}.gguf", {"w": (raw, qtype)})
    out = dequantize(_read_tensor(path, "w"))
    assert out.shape == (ROWS, COLS)
    np.testing.assert_allclose(out, _ref_dequantize(raw, qtype), rtol=1e-5, atol=1e-6)


def _f16_bytes(value: float) -> list[int]:
    return list(np.array([value], np.float16).view(np.uint8))


def test_q4_k_hand_built_block(tmp_path):
    # d=1, dmin=1; sub-blocks 0-3: scale 2, min 1; sub-blocks 4-7: scale 1, min 2; every byte of qs is 0x53.
    block = _f16_bytes(1.0) + _f16_bytes(1.0) + [2] * 4 + [1] * 4 + [0x21] * 4 + [0x53] * 128
    raw = np.array([block], np.uint8)
    path = _write_gguf(tmp_path / "q4k.gguf", {"w": (raw, T.Q4_K)})
    # value = d*scale*nibble - dmin*min; low nibble 3, high nibble 5, 32 values per sub-block
    expected = [2 * 3 - 1] * 32 + [2 * 5 - 1] * 32
    expected = expected * 2 + ([1 * 3 - 2] * 32 + [1 * 5 - 2] * 32) * 2
    np.testing.assert_array_equal(dequantize(_read_tensor(path, "w")), [expected])


def test_q6_k_hand_built_block(tmp_path):
    # d=0.5 and every scale 2 (so d*scale = 1); ql bytes 0x21; qh bytes 0b11_10_01_00 give q's high 2 bits 0,1,2,3.
    block = [0x21] * 128 + [0xE4] * 64 + [2] * 16 + _f16_bytes(0.5)
    raw = np.array([block], np.uint8)
    path = _write_gguf(tmp_path / "q6k.gguf", {"w": (raw, T.Q6_K)})
    # q = (4 low bits | 2 high bits << 4) - 32: (1|0)-32, (1|16)-32, (2|32)-32, (2|48)-32
    expected = ([-31] * 32 + [-15] * 32 + [2] * 32 + [18] * 32) * 2
    np.testing.assert_array_equal(dequantize(_read_tensor(path, "w")), [expected])


def test_unsupported_type_names_tensor_and_type(tmp_path, weights):
    raw = gguf.quants.quantize(weights, T.Q5_0)
    path = _write_gguf(tmp_path / "q5.gguf", {"blk.0.ffn_up.weight": (raw, T.Q5_0)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q5_0.*supported types: F32"):
        dequantize(_read_tensor(path, "blk.0.ffn_up.weight"))


# ---------------------------------------------------------------------------------------------------------------
# A tiny model file: config, names, q/k un-permutation


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 4, 2, 8, 48, 64


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: what llama.cpp does to HF q/k before writing."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_weights(bias: bool, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    r = lambda *shape: rng.normal(0, 1, shape).astype(np.float32)  # noqa: E731
    hf = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        hf["lm_head.weight"] = r(VOCAB, HIDDEN)
    p = "model.layers.0."
    hf |= {p + "input_layernorm.weight": r(HIDDEN), p + "post_attention_layernorm.weight": r(HIDDEN),
           p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
           p + "mlp.gate_proj.weight": r(FFN, HIDDEN), p + "mlp.up_proj.weight": r(FFN, HIDDEN),
           p + "mlp.down_proj.weight": r(HIDDEN, FFN)}
    if bias:
        hf |= {p + "self_attn.q_proj.bias": r(HEADS * HEAD_DIM), p + "self_attn.k_proj.bias": r(KV_HEADS * HEAD_DIM),
               p + "self_attn.v_proj.bias": r(KV_HEADS * HEAD_DIM)}
    return hf


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "rope_freqs.weight":
        return hf_name
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"


def _write_tiny_model(path, arch: str, hf: dict[str, np.ndarray], **extra_metadata) -> str:
    tensors = {}
    for name, value in hf.items():
        if arch == "llama" and ".q_proj." in name:
            value = _llama_cpp_permute(value, HEADS)
        elif arch == "llama" and ".k_proj." in name:
            value = _llama_cpp_permute(value, KV_HEADS)
        tensors[_gguf_name(name)] = value
    metadata = dict(block_count=1, context_length=256, embedding_length=HIDDEN, feed_forward_length=FFN,
                    head_count=HEADS, head_count_kv=KV_HEADS, rope_freq_base=500000.0, layer_norm_rms_eps=1e-6,
                    vocab_size=VOCAB)
    return _write_gguf(path, tensors, arch=arch, **(metadata | extra_metadata))


@pytest.mark.parametrize("arch, bias", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_model_tensors_equal_hf_layout(tmp_path, arch, bias):
    hf = _tiny_hf_weights(bias=bias, tied=arch == "qwen2")
    gguf_file = GGUFFile(_write_tiny_model(tmp_path / "tiny.gguf", arch, hf))
    loaded = dict(gguf_file.iter_tensors(dtype=torch.float32))
    assert sorted(loaded) == sorted(hf)
    for name, expected in hf.items():
        torch.testing.assert_close(loaded[name], torch.from_numpy(expected), rtol=0, atol=0, msg=name)
    config = gguf_file.model_config()
    assert sorted(hf_tensor_names(config)) == sorted(hf)
    assert (config.architecture, config.attention_bias, config.tie_word_embeddings) == (arch, bias, arch == "qwen2")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        HIDDEN, HEADS, KV_HEADS, HIDDEN // HEADS)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (500000.0, 1e-6, 256)
    assert config.rope_scaling is None


def test_dtype_and_laziness(tmp_path):
    gguf_file = GGUFFile(_write_tiny_model(tmp_path / "tiny.gguf", "llama", _tiny_hf_weights(False, False)))
    stream = gguf_file.iter_tensors(dtype=torch.bfloat16)
    name, tensor = next(stream)  # one tensor at a time
    assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"


def test_rope_scaling_and_head_dim_metadata(tmp_path):
    path = _write_tiny_model(tmp_path / "tiny.gguf", "llama", _tiny_hf_weights(False, False),
                             rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                             rope_scaling_orig_ctx_len=64, key_length=HEAD_DIM)
    config = GGUFFile(path).model_config()
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert config.head_dim == HEAD_DIM


def _hf_llama3_freq_divisors(factor: float) -> np.ndarray:
    """inv_freq / transformers' llama3 inv_freq: what llama.cpp stores as rope_freqs.weight."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=HEAD_DIM * HEADS, num_attention_heads=HEADS, head_dim=64,
                         rope_parameters=scaling, max_position_embeddings=131072)
    inv_freq_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    return (inv_freq / inv_freq_scaled.double().numpy()).astype(np.float32)


def test_llama3_rope_recovered_from_rope_freqs(tmp_path):
    hf = _tiny_hf_weights(False, False)
    path = _write_tiny_model(tmp_path / "l3.gguf", "llama", hf | {"rope_freqs.weight": _hf_llama3_freq_divisors(32.0)},
                             key_length=64)
    assert GGUFFile(path).model_config().rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(GGUFFile(path).iter_tensors())  # config, not a weight

    odd = np.linspace(1, 3, 32, dtype=np.float32)  # no llama3 schedule: passed on as divisors
    path = _write_tiny_model(tmp_path / "odd.gguf", "llama", hf | {"rope_freqs.weight": odd}, key_length=64)
    scaling = GGUFFile(path).model_config().rope_scaling
    assert scaling["rope_type"] == "freq_factors" and scaling["freq_factors"] == pytest.approx(odd.tolist())


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gemma.gguf", {"token_embd.weight": np.zeros((4, 4), np.float32)}, arch="gemma")
    with pytest.raises(ValueError, match=r"'gemma'.*supported architectures: llama, qwen2"):
        GGUFFile(path)


def test_mixture_of_experts_refused(tmp_path):
    path = _write_gguf(tmp_path / "moe.gguf", {"token_embd.weight": np.zeros((4, 4), np.float32)}, expert_count=8)
    with pytest.raises(ValueError, match="expert_count"):
        GGUFFile(path)


def test_unknown_tensor_name(tmp_path):
    hf = _tiny_hf_weights(False, False)
    path = _write_tiny_model(tmp_path / "tiny.gguf", "llama", hf)
    # an extra tensor only in the file: rewrite with it
    tensors = {t.name: dequantize(t) for t in gguf.GGUFReader(path).tensors}
    tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, 2), np.float32)
    path = _write_gguf(tmp_path / "extra.gguf", tensors, block_count=1, embedding_length=HIDDEN, head_count=HEADS)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        list(GGUFFile(path).iter_tensors())


# ---------------------------------------------------------------------------------------------------------------
# The default model against transformers' GGUF loader


@pytest.mark.slow
def test_default_model_equals_transformers(default_gguf_path, hf_reference_model):
    started = time.perf_counter()
    source = resolve_model("smollm2-135m")
    compared_layers = ("model.layers.0.", "model.layers.1.", "model.layers.29.")
    ours, names = {}, []
    for name, tensor in source.iter_tensors(dtype=torch.float32):  # the whole model, as the engine loads it
        names.append(name)
        if name.startswith(compared_layers) or not name.startswith("model.layers."):
            ours[name] = tensor
    load_time_s = time.perf_counter() - started
    print(f"whole-model load (open + dequantize 272 tensors to fp32): {load_time_s:.2f} s")

    reference = hf_reference_model.state_dict()
    assert sorted(names) == sorted(k for k in reference if k != "lm_head.weight")  # tied: no lm_head
    assert len(ours) == 3 * 9 + 2
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)

    hf_config, config = hf_reference_model.config, source.config
    assert config.name == "smollm2-135m" and source.format == "gguf"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
