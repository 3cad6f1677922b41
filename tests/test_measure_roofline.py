"""Roofline counts against a hand computation for a small config, and against SmolLM2-135M's known size."""
import pytest

from pernode.config import ModelConfig
from pernode.measure.profile.roofline import (count_params, crossover_batch_size, decode_step_cost, place_on_roofline,
                                      prefill_cost, ridge_intensity, roofline_time_s, weight_bytes)


def tiny(**kw):
    # vocab 100, hidden 16, intermediate 40, 2 layers, 4 heads of 4, 2 KV heads -> q_dim 16, kv_dim 8.
    return ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **kw)


# Hand computation for tiny():
#   per layer: q 16*16 = 256, k 16*8 = 128, v 128, o 16*16 = 256          -> attention 768
#              MLP 3 * 16 * 40 = 1920                                      -> linear 2688
#              2 RMSNorm vectors 2 * 16 = 32                               -> layer 2720
#   2 layers: 5440 (linear 5376); embedding 100*16 = 1600; LM head 1600 (untied); final norm 16
#   total untied = 1600 + 1600 + 5440 + 16 = 8656; tied = 7056
#   KV bytes per token at 2 bytes: 2 (K,V) * 2 layers * 2 kv heads * 4 head_dim * 2 = 64
def test_param_count_by_hand():
    p = count_params(tiny())
    assert (p.linear_per_layer, p.other_per_layer, p.linear, p.layers) == (2688, 32, 5376, 5440)
    assert (p.embedding, p.lm_head, p.final_norm) == (1600, 1600, 16)
    assert p.total == 8656
    assert count_params(tiny(tie_word_embeddings=True)).total == 7056  # the embedding counted once
    assert weight_bytes(tiny(), 2) == 8656 * 2
    assert weight_bytes(tiny(tie_word_embeddings=True), 4) == 7056 * 4
    # Qwen2-style q/k/v biases: 16 + 8 + 8 = 32 more per layer.
    assert count_params(tiny(attention_bias=True)).total == 8656 + 2 * 32
    assert tiny().kv_bytes_per_token(2) == 64


def test_smollm2_135m_param_count():
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert count_params(cfg).total == 134_515_008  # the published size of SmolLM2-135M


def test_decode_step_by_hand():
    # B = 2 sequences attending to 3 and 5 tokens, bf16 weights and KV.
    c = decode_step_cost(tiny(), [3, 5], weight_bytes_per_param=2, kv_bytes_per_element=2)
    assert c.flops_matmul == 2 * 5376 * 2                 # 21504
    assert c.flops_lm_head == 2 * 100 * 16 * 2            # 6400
    assert c.flops_attention == 4 * 2 * 16 * (3 + 5)      # 1024: 4 * layers * q_dim * sum(L)
    assert c.flops == 21504 + 6400 + 1024
    # Weights read: layers 5440 + final norm 16 + LM head matrix 1600 + 2 embedding rows of 16 = 7088 params.
    assert c.bytes_weights == 7088 * 2
    assert c.bytes_kv_read == (3 + 5) * 64
    assert c.bytes_kv_write == 2 * 64
    assert c.bytes == 14176 + 512 + 128
    assert c.arithmetic_intensity == pytest.approx(28928 / 14816)
    # Tying changes what is stored, not what is read: the LM head matrix is streamed either way.
    assert decode_step_cost(tiny(tie_word_embeddings=True), [3, 5]).bytes == c.bytes


def test_prefill_by_hand():
    c = prefill_cost(tiny(), 4, weight_bytes_per_param=2, kv_bytes_per_element=2)
    assert c.flops_matmul == 2 * 5376 * 4
    assert c.flops_lm_head == 2 * 100 * 16 * 1  # only the last position's logits
    # Causal: token j attends to j keys, 1 + 2 + 3 + 4 = 10 pairs, 4 FLOPs per pair per q dim per layer.
    assert c.flops_attention == 4 * 2 * 16 * 10
    assert c.bytes_weights == (5440 + 16 + 1600 + 4 * 16) * 2
    assert c.bytes_kv_read == 4 * 64 and c.bytes_kv_write == 4 * 64
    # With 3 cached tokens, the 4 new ones attend to 4, 5, 6, 7 keys = 22 pairs.
    c2 = prefill_cost(tiny(), 4, prefix_len=3)
    assert c2.flops_attention == 4 * 2 * 16 * 22
    assert c2.bytes_kv_read == 7 * 64
    assert prefill_cost(tiny(), 4, logits_for_all_tokens=True).flops_lm_head == 2 * 1600 * 4
    # Brute force the causal pair count.
    assert sum(min(k, q) == k for q in range(1, 5) for k in range(1, 5)) == 10


def test_place_on_roofline():
    # 1 GFLOP and 1 GB in 0.1 s: 10 GB/s and 10 GFLOP/s. Peaks 20 GB/s and 100 GFLOP/s: ridge 5 FLOP/B.
    rp = place_on_roofline(1e9, 1e9, 0.1, peak_bandwidth_gbs=20, peak_flops=1e11)
    assert ridge_intensity(20, 1e11) == pytest.approx(5.0)
    assert rp.bound == "memory" and rp.arithmetic_intensity == pytest.approx(1.0)
    assert rp.achieved_gbs == pytest.approx(10.0) and rp.achieved_flops == pytest.approx(1e10)
    assert rp.fraction_of_peak == pytest.approx(0.5)
    assert rp.roofline_time_s == pytest.approx(0.05)  # max(1e9 / 20e9, 1e9 / 1e11)
    rp = place_on_roofline(1e11, 1e9, 2.0, peak_bandwidth_gbs=20, peak_flops=1e11)
    assert rp.bound == "compute" and rp.fraction_of_peak == pytest.approx(0.5)
    assert roofline_time_s(1e11, 1e9, 20, 1e11) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="time_s"):
        place_on_roofline(1, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="peak_bandwidth_gbs"):
        ridge_intensity(0, 1)


def test_crossover_batch_size():
    cfg, ctx, bw, peak = tiny(), 8, 10.0, 1e11  # ridge 10 FLOP/B
    b = crossover_batch_size(cfg, ctx, bw, peak)
    ridge = ridge_intensity(bw, peak)
    assert decode_step_cost(cfg, [ctx] * b).arithmetic_intensity >= ridge
    assert b == 1 or decode_step_cost(cfg, [ctx] * (b - 1)).arithmetic_intensity < ridge
    # Closed form: a = 2*5376 + 2*1600 + 4*2*16*8 = 14976 FLOPs/seq; W = (5440+16+1600)*2 = 14112 B;
    # c = 16*2 + 9*64 = 608 B/seq; B = ceil(10 * 14112 / (14976 - 10 * 608)) = ceil(15.86) = 16.
    assert b == 16
    # A ridge above the asymptote a/c = 24.6 FLOP/B is never reached: KV traffic keeps decode memory-bound.
    assert crossover_batch_size(cfg, ctx, 1.0, 1e11) is None
    with pytest.raises(ValueError, match="context_lens"):
        decode_step_cost(cfg, [])
