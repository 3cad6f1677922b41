"""The fused decoder stack (one C++ call for every layer of a decode-sized step) against the per-op layers it
replaces: the same logits and the same K/V written, over dense, int4 and int8 projections, fp32 and bf16, batches of
1..32 (up to 64 rows) with ragged contexts, and the same greedy tokens from the default model. Where int8 x is capped
(AVX2) the stack's decode steps keep it past the cap (measured per shape); the kernel-for-kernel comparisons pin
that at the cap, and one test holds the stack's int8 decode steps to per-op layers that quantize x everywhere."""
from __future__ import annotations

import pytest
import torch

from pernode.config import EngineConfig
from pernode.quant_format import QuantScheme
from pernode.serve.kernels import decoder_stack
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.kv_quant import allocate_kv_cache
from pernode.serve.kernels.quant_linear import QuantLinear, replace_linears
from pernode.serve.models.llama import LlamaForCausalLM

from tiny_model import tiny_config

pytestmark = pytest.mark.skipif(decoder_stack.load_kernel() is None, reason="decoder_stack kernel did not build")



@pytest.fixture(autouse=True)
def decode_steps_at_the_cap(monkeypatch):
    """Decode steps quantize x exactly as far as the per-op layers do, so the two paths run the same kernels."""
    monkeypatch.setenv("PERNODE_DECODE_INT8_ROWS", "8")


BLOCK_SIZE = 16
NUM_BLOCKS = 128
SCHEMES = {
    "dense": None,
    "int4": QuantScheme(4, 32, symmetric=False, float_min=True),  # GGUF Q4_1's form, the default model's
    "int4-sym": QuantScheme(4, 32),
    "int8": QuantScheme(8, None),
}


def tiny_model(weights: str, dtype: torch.dtype, architecture: str = "llama") -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(architecture, vocab_size=512, num_hidden_layers=3))
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.5)
        for layer in model.layers:  # norms away from 1 so a missed weight shows
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            if layer.self_attn.qkv_proj.bias is not None:
                layer.self_attn.qkv_proj.bias.normal_(0, 0.1)
    scheme = SCHEMES[weights]
    if scheme is not None:
        replace_linears(model, scheme)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                lo, hi = (-8, 8) if scheme.num_bits == 4 else (-127, 128)
                groups = m.weight_scale.shape[1]
                q = torch.randint(lo, hi, (m.out_features, m.in_features), dtype=torch.int8)
                scale = torch.rand(m.out_features, groups) / (10 * hi) + 1e-3
                zero = -torch.rand(m.out_features, groups) * 0.05 if scheme.float_min else None
                m.set_quantized(q, scale, zero)
    return model.to(dtype).eval()


def caches_for(model: LlamaForCausalLM, dtype: torch.dtype):
    c = model.config
    shape = (NUM_BLOCKS, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.num_hidden_layers)]


def clone(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def step(model, caches, tables, num_cached, query_lens, ids):
    meta = AttentionMetadata.build(tables, num_cached, query_lens, BLOCK_SIZE)
    positions = torch.cat([torch.arange(n, n + q) for n, q in zip(num_cached, query_lens)])
    return model(ids, positions, caches, meta)


def prefilled(model, dtype, contexts):
    """Caches holding `contexts[s]` tokens of sequence s (written by the per-op layers), and the block tables."""
    fused, model.fused_decoder = model.fused_decoder, None
    caches = caches_for(model, dtype)
    per_seq = NUM_BLOCKS // len(contexts)
    tables = torch.arange(len(contexts) * per_seq, dtype=torch.int32).view(len(contexts), per_seq)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for s, n in enumerate(contexts):
            ids = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
            step(model, caches, tables[s:s + 1], [0], [n], ids)
    model.fused_decoder = fused
    return caches, tables


def both_paths(model, caches, tables, num_cached, query_lens):
    """(per-op logits, caches), (fused logits, caches) of one step from the same starting caches."""
    ids = torch.randint(0, model.config.vocab_size, (sum(query_lens),), generator=torch.Generator().manual_seed(2))
    fused = model.fused_decoder
    assert fused is not None
    out = []
    with torch.inference_mode():
        for decoder in (None, fused):
            model.fused_decoder = decoder
            c = clone(caches)
            out.append((step(model, c, tables, num_cached, query_lens, ids), c))
    return out


CONTEXTS = [5, 40, 17, 1, 63, 16, 2, 33]  # ragged: partial blocks, exact block ends, one token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", list(SCHEMES))
def test_fused_stack_matches_the_per_op_layers(weights, dtype):
    model = tiny_model(weights, dtype)
    assert model.use_fused_decoder()
    for batch in (1, 2, 5, 8):
        contexts = CONTEXTS[:batch]
        caches, tables = prefilled(model, dtype, contexts)
        (ref, ref_caches), (got, got_caches) = both_paths(model, caches, tables, contexts, [1] * batch)
        # the same kernels in the same order: equal to the bit, not just close
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        for (k0, v0), (k1, v1) in zip(ref_caches, got_caches):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.parametrize("weights", ["dense", "int4", "int8"])
def test_fused_stack_matches_the_per_op_layers_at_decode_batches_up_to_64_rows(weights):
    """Several GEMV passes of 8 rows, and the GEMM wherever a shape's measured crossover lies below the row count."""
    model = tiny_model(weights, torch.bfloat16)
    assert model.use_fused_decoder()
    for batch, query_len in ((32, 1), (16, 4)):  # 32 decodes; 16 sequences verifying 3 proposed tokens: 64 rows
        contexts = [(7 * s) % 60 + 1 for s in range(batch)]
        caches, tables = prefilled(model, torch.bfloat16, contexts)
        (ref, ref_caches), (got, got_caches) = both_paths(model, caches, tables, contexts, [query_len] * batch)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        for (k0, v0), (k1, v1) in zip(ref_caches, got_caches):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.usefixtures("int8_x")
@pytest.mark.parametrize("weights", ["int4", "int4-sym"])
def test_fused_stack_runs_the_panel_kernel_as_the_per_op_layers_do(weights, monkeypatch):
    """int4 decode batches past the panel crossover (fixed low here) take the panel kernel on both paths."""
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "3")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1000")
    model = tiny_model(weights, torch.bfloat16)
    assert model.use_fused_decoder()
    proj = model.layers[0].mlp.gate_up_proj
    assert proj.panel_from_rows(torch.bfloat16) == 3 and proj.gemm_from_rows(torch.bfloat16) == 1000
    for batch, query_len in ((2, 1), (13, 1), (16, 4)):
        contexts = [(5 * s) % 60 + 1 for s in range(batch)]
        caches, tables = prefilled(model, torch.bfloat16, contexts)
        (ref, ref_caches), (got, got_caches) = both_paths(model, caches, tables, contexts, [query_len] * batch)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        for (k0, v0), (k1, v1) in zip(ref_caches, got_caches):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_fused_stack_covers_verify_steps_and_qkv_bias():
    """Several query tokens per sequence (a speculative verify step) and a Qwen2-style qkv bias."""
    model = tiny_model("int4", torch.bfloat16, architecture="qwen2")
    assert model.use_fused_decoder()
    contexts = [9, 30, 16]
    caches, tables = prefilled(model, torch.bfloat16, contexts)
    (ref, _), (got, _) = both_paths(model, caches, tables, contexts, [3, 1, 4])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_capped_cpus_decode_steps_keep_int8_x_up_to_the_measured_rows(monkeypatch):
    """AVX2 (int8 x capped at 8 rows for prefill): a decode or verify step of up to PERNODE_DECODE_INT8_ROWS rows
    runs the int8-x GEMV, bit for bit what per-op layers quantizing x in every call give; past them, and in any
    step holding more than 8 tokens of one sequence (a prompt chunk), x stays float as in the per-op layers."""
    from pernode.serve.kernels import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.delenv("PERNODE_QUANT_INPUT", raising=False)
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1000")
    monkeypatch.setenv("PERNODE_DECODE_INT8_ROWS", "16")
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "off")  # the GEMV throughout: the panel is the next test's
    capped = tiny_model("int4", torch.float32)
    assert capped.use_fused_decoder()
    proj = capped.layers[0].mlp.gate_up_proj
    assert proj.decode_int8_max_rows(torch.float32) == 16 and not proj.quantizes_input(9)
    assert 17 in proj.kernel_switch_rows(torch.float32) and 9 in proj.kernel_switch_rows(torch.float32)
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "int8")
    everywhere = tiny_model("int4", torch.float32)  # the same weights, x quantized in every GEMV call
    for query_lens, int8_x in (([1] * 12, True), ([3] * 4, True), ([1] * 16, True), ([1] * 20, False),
                               ([10, 1, 1], False)):
        contexts = [(7 * s) % 50 + 1 for s in range(len(query_lens))]
        caches, tables = prefilled(capped, torch.float32, contexts)
        (per_op, _), (fused, fused_caches) = both_paths(capped, caches, tables, contexts, query_lens)
        if int8_x:
            ids = torch.randint(0, capped.config.vocab_size, (sum(query_lens),),
                                generator=torch.Generator().manual_seed(2))
            with torch.inference_mode():
                reference = step(everywhere, clone(caches), tables, contexts, query_lens, ids)
            torch.testing.assert_close(fused, reference, rtol=0, atol=0)
            assert not torch.equal(fused, per_op)  # float x would have been another kernel
        else:
            torch.testing.assert_close(fused, per_op, rtol=0, atol=0)


def test_steps_the_fused_stack_does_not_cover_take_the_per_op_layers(monkeypatch):
    model = tiny_model("int4", torch.float32)
    assert model.use_fused_decoder()
    fused = model.fused_decoder
    x = torch.zeros(65, model.config.hidden_size)
    caches = caches_for(model, torch.float32)
    with torch.inference_mode():
        assert fused.applies(x[:64], caches)
        assert not fused.applies(x, caches)  # a prefill-sized step
        assert not fused.applies(x[:1].bfloat16(), caches)  # not the model's dtype
    assert not fused.applies(x[:1], caches)  # gradients enabled: the op has no autograd formula
    int8_caches = [(allocate_kv_cache(k.shape, "int8", torch.float32, "cpu"),
                    allocate_kv_cache(v.shape, "int8", torch.float32, "cpu")) for k, v in caches]
    with torch.inference_mode():
        assert not fused.applies(x[:1], int8_caches)
    monkeypatch.setenv("PERNODE_FUSED_DECODE", "reference")
    assert not model.use_fused_decoder()
    monkeypatch.setenv("PERNODE_FUSED_DECODE", "sometimes")
    with pytest.raises(ValueError, match="PERNODE_FUSED_DECODE"):
        model.use_fused_decoder()


def test_default_model_greedy_tokens_are_the_per_op_tokens():
    from pernode.serve.engine.llm_engine import LLMEngine
    from pernode.serve.sampling.params import SamplingParams

    engine = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_bytes=64 * 2**20))
    fused = engine.model.fused_decoder
    assert fused is not None  # the engine turns it on for the default model

    def greedy(prompt: str) -> list[int]:
        engine.add_request("r", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return list(out.outputs[0].token_ids)
        raise AssertionError("no output")

    for prompt in ("The capital of France is", "def fib(n):", "Hi!"):
        engine.model.fused_decoder = fused
        got = greedy(prompt)
        engine.model.fused_decoder = None
        assert got == greedy(prompt), prompt


def test_capped_cpus_decode_steps_run_the_panel_from_its_crossover(monkeypatch):
    """AVX2: the panel kernel (csrc/panel_int8x_avx2.h) is on by default there, for what takes int8 x anyway. A
    decode step from PERNODE_PANEL_FROM_ROWS rows runs it, bit for bit what per-op layers that quantize x in every
    call and run the panel from the same rows give; a prompt chunk of as many rows keeps float x and the GEMM."""
    from pernode.serve.kernels import cpu_features

    if not cpu_features.multiplies_int16_gemm():
        pytest.skip("the AVX2 panel kernel is built on AVX2 CPUs without AVX-512")
    monkeypatch.delenv("PERNODE_QUANT_INPUT", raising=False)
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1000")
    monkeypatch.setenv("PERNODE_DECODE_INT8_ROWS", "32")
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "12")
    capped = tiny_model("int4", torch.float32)
    assert capped.use_fused_decoder()
    proj = capped.layers[0].mlp.gate_up_proj
    assert proj.panel_from_rows(torch.float32) == 12 and not proj.quantizes_input(12)
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "int8")
    everywhere = tiny_model("int4", torch.float32)
    assert everywhere.layers[0].mlp.gate_up_proj.panel_from_rows(torch.float32) == 12
    for query_lens in ([1] * 12, [1] * 20, [4] * 5):
        contexts = [(5 * s) % 40 + 1 for s in range(len(query_lens))]
        caches, tables = prefilled(capped, torch.float32, contexts)
        (per_op, _), (fused, _) = both_paths(capped, caches, tables, contexts, query_lens)
        ids = torch.randint(0, capped.config.vocab_size, (sum(query_lens),), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            reference = step(everywhere, clone(caches), tables, contexts, query_lens, ids)
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)
        assert not torch.equal(fused, per_op)  # the per-op layers keep float x past 8 rows
