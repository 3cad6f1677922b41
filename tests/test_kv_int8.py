"""The quantized KV cache: int8 values with per-token scales read by the C++ kernel, the reference and SDPA alike;
its capacity gain in the engine; and its quality cost on the default model (same greedy tokens, bounded perplexity)."""
from __future__ import annotations

import pytest
import torch

from pernode.config import EngineConfig
from pernode.serve.kernels.attention import (paged_attention, paged_attention_reference, paged_attention_sdpa,
                                             write_kv_cache)
from pernode.serve.kernels.attention_metadata import AttentionMetadata, contiguous_block_tables
from pernode.serve.kernels.kv_quant import (QuantizedKV, allocate_kv_cache, dequantize, kv_bytes_per_token,
                                            quantize_rows)
from pernode.serve.kernels.paged_attention_cpu import kernel_supports, load_kernel, paged_attention_cpu
from test_paged_attention import MIXED, make_problem
from tiny_model import tiny_config, write_tiny_model

CPU = torch.device("cpu")


def quantized_copy(k_cache: torch.Tensor, storage: str = "int8") -> QuantizedKV:
    """The float cache of `make_problem` written slot by slot into a quantized cache (unused NaN slots as zeros)."""
    nb, bs, h, d = k_cache.shape
    q = allocate_kv_cache((nb, bs, h, d), storage, torch.float32, CPU)
    write_kv_cache(torch.nan_to_num(k_cache).view(-1, h, d), torch.zeros(nb * bs, h, d), q,
                   allocate_kv_cache((nb, bs, h, d), storage, torch.float32, CPU), torch.arange(nb * bs))
    return q


def quantized_problem(seqs, hq, hkv, d, block_size, dtype=torch.float32, seed=0):
    query, k, v, meta, scale = make_problem(seqs, hq, hkv, d, block_size, dtype, seed)
    return query, quantized_copy(k), quantized_copy(v), meta, scale


def test_quantize_rows_error_is_half_a_step_per_element():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]  # rows of very different magnitudes
    q, scale = quantize_rows(x, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (50, 3)
    err = (dequantize(q, scale) - x).abs()
    assert torch.all(err <= scale[..., None] * 0.5 + 1e-7)
    assert torch.equal(q.abs().amax(-1), torch.full((50, 3), 127, dtype=torch.int8))  # the full range is used
    zeros_q, zeros_scale = quantize_rows(torch.zeros(2, 1, 16), torch.int8)
    assert torch.all(zeros_q == 0) and torch.all(zeros_scale > 0)  # no division by zero


def test_fp8_rows_relative_error():
    x = torch.randn(40, 2, 64)
    q, scale = quantize_rows(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    rel = (dequantize(q, scale) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert rel.max() < 2 ** -4  # e4m3: 3 mantissa bits, half an ulp relative to the row's largest value


def test_bytes_per_token_and_layout():
    cfg = tiny_config()  # 2 layers, 2 kv heads, head_dim 16
    assert kv_bytes_per_token(cfg, 4, "auto") == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(cfg, 4, "int8") == 2 * 2 * 2 * (16 + 4)
    assert kv_bytes_per_token(cfg, 2, "fp8") == 2 * 2 * 2 * (16 + 4)
    cache = allocate_kv_cache((5, 16, 2, 16), "int8", torch.float32, CPU)
    assert cache.data.shape == (5, 16, 2, 16) and cache.scale.shape == (5, 16, 2)
    assert cache.data.element_size() * 16 + cache.scale.element_size() == 16 + 4
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'.*allowed auto, float32, float16, bfloat16, int8, fp8"):
        kv_bytes_per_token(cfg, 4, "int4")


def test_blocks_filled_over_steps_keep_each_token_exact():
    """A block written one token per step: a late large token must not disturb the earlier ones (per-token scales)."""
    cache = allocate_kv_cache((2, 4, 1, 16), "int8", torch.float32, CPU)
    other = allocate_kv_cache((2, 4, 1, 16), "int8", torch.float32, CPU)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(1, 1, 16, generator=g) * m for m in (0.01, 1.0, 100.0, 0.1)]
    for slot, x in zip((4, 5, 6, 7), tokens):  # block 1, filled over four steps
        write_kv_cache(x, x, cache, other, torch.tensor([slot]))
    back = dequantize(cache.data[1], cache.scale[1])  # [4, 1, 16]
    for i, x in enumerate(tokens):
        assert torch.allclose(back[i], x[0], rtol=0, atol=float(x.abs().max()) / 127 * 0.5 + 1e-9)
    assert torch.all(cache.data[0] == 0)  # block 0 untouched


@pytest.fixture(scope="module")
def kernel():
    if load_kernel() is None:
        pytest.skip("the C++ paged attention kernel did not build here")


@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 64), (4, 4, 128), (8, 2, 32)])
def test_int8_kernel_matches_reference_with_ragged_tails(kernel, hq, hkv, d):
    query, kq, vq, meta, scale = quantized_problem(MIXED, hq, hkv, d, block_size=16)
    assert kernel_supports(query, kq, vq)
    ref = paged_attention_reference(query, kq, vq, meta, scale)
    out = paged_attention_cpu(query, kq, vq, meta, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 7, 32])
def test_int8_kernel_odd_block_sizes_and_bf16_queries(kernel, block_size):
    seqs = [(1, 1), (45, 1), (70, 70), (33, 9), (300, 1)]
    query, kq, vq, meta, scale = quantized_problem(seqs, 4, 2, 64, block_size, dtype=torch.bfloat16, seed=3)
    ref = paged_attention_reference(query, kq, vq, meta, scale)
    torch.testing.assert_close(paged_attention_cpu(query, kq, vq, meta, scale), ref, rtol=1.6e-2, atol=1e-2)


def test_int8_long_context_split_across_threads(kernel):
    """One long decode: the kernel slices the kv range across threads and merges; the scales go with each slice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        query, kq, vq, meta, scale = quantized_problem([(3000, 1)], 4, 1, 64, 16, seed=5)
        ref = paged_attention_reference(query, kq, vq, meta, scale)
        torch.testing.assert_close(paged_attention_cpu(query, kq, vq, meta, scale), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_int8_is_close_to_the_float_cache_and_sdpa_agrees():
    query, k, v, meta, scale = make_problem(MIXED, 6, 2, 64, 16)
    kq, vq = quantized_copy(k), quantized_copy(v)
    exact = paged_attention_reference(query, torch.nan_to_num(k), torch.nan_to_num(v), meta, scale)
    ref = paged_attention_reference(query, kq, vq, meta, scale)
    assert (ref - exact).abs().max() < 0.05 and (ref - exact).abs().mean() < 0.005
    torch.testing.assert_close(paged_attention_sdpa(query, kq, vq, meta, scale), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_attention(query, kq, vq, meta, scale), ref, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_int8_without_scales(kernel):
    query, kq, vq, meta, scale = quantized_problem([(20, 4)], 2, 1, 16, 16)
    op = load_kernel()
    with pytest.raises(RuntimeError, match="k_scale and v_scale are required"):
        op(query, kq.data, vq.data, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale, None, None)


def test_fp8_cache_through_reference_and_sdpa_paths():
    """The fp8 code path (served on CUDA by SDPA) checked on CPU: both float paths dequantize alike, and the
    dispatcher sends a cache the C++ kernel does not read to the reference."""
    query, k, v, meta, scale = make_problem(MIXED, 6, 2, 64, 16)
    kq, vq = quantized_copy(k, "fp8"), quantized_copy(v, "fp8")
    assert kq.data.dtype == torch.float8_e4m3fn and not kernel_supports(query, kq, vq)
    ref = paged_attention_reference(query, kq, vq, meta, scale)
    exact = paged_attention_reference(query, torch.nan_to_num(k), torch.nan_to_num(v), meta, scale)
    assert (ref - exact).abs().max() < 0.15
    torch.testing.assert_close(paged_attention_sdpa(query, kq, vq, meta, scale), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_attention(query, kq, vq, meta, scale), ref, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 KV cache runs on CUDA")
def test_fp8_cache_on_cuda_matches_reference():
    query, k, v, meta, scale = make_problem(MIXED, 6, 2, 64, 16)
    dev = torch.device("cuda")
    kq, vq = quantized_copy(k, "fp8"), quantized_copy(v, "fp8")
    kq, vq = QuantizedKV(kq.data.to(dev), kq.scale.to(dev)), QuantizedKV(vq.data.to(dev), vq.scale.to(dev))
    meta_dev = AttentionMetadata(**{f: (getattr(meta, f).to(dev) if torch.is_tensor(getattr(meta, f))
                                        else getattr(meta, f)) for f in meta.__dataclass_fields__})
    out = paged_attention(query.to(dev), kq, vq, meta_dev, scale)
    exact = paged_attention_reference(query, torch.nan_to_num(k), torch.nan_to_num(v), meta, scale)
    assert (out.cpu() - exact).abs().max() < 0.15


def test_engine_config_names_the_setting():
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' is not supported: allowed auto, float32, float16, bfloat16, int8, fp8"):
        EngineConfig(kv_cache_dtype="int4")


def test_engine_int8_kv_holds_more_tokens_and_decodes_the_same(tmp_path):
    from pernode.serve.engine.llm_engine import LLMEngine
    from pernode.serve.sampling.params import SamplingParams

    folder = write_tiny_model(str(tmp_path / "tiny"), tiny_config(head_dim=32, hidden_size=128))
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time " * 5]
    tokens, blocks = {}, {}
    for kv_dtype in ("float32", "int8"):
        engine = LLMEngine(EngineConfig(model=folder, device="cpu", kv_cache_bytes=2**20, max_model_len=256,
                                        dtype="float32", kv_cache_dtype=kv_dtype))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        tokens[kv_dtype], blocks[kv_dtype] = done, engine.num_blocks
    assert blocks["int8"] >= 3.5 * blocks["float32"]  # (32 + 4) bytes per head per token instead of 128
    assert tokens["int8"] == tokens["float32"]

    # The profile records the int8 cache's bytes and capacity, which the planner's KV-limited batch reads.
    from pernode.measure.profile.profiler import run_profile

    hardware = {"name": "test cpu", "device": "cpu", "memory_bytes": 24 * 2**30, "peak_bandwidth_gbs": 20.0,
                "peak_flops": {"fp32": 1.5e11, "bf16": None, "int8": 6.0e11}, "peak_source": "measured"}
    profile = run_profile(engine, quick=True, hardware=hardware, batch_sizes=[1, 2], prompt_lens=[16],
                          context_len=32)
    assert profile["model"]["kv_dtype"] == "int8"
    assert profile["model"]["kv_bytes_per_token"] == engine.kv_bytes_per_token == 2 * 2 * 2 * (32 + 4)
    assert profile["kv_cache"]["max_tokens"] == blocks["int8"] * 16
    with pytest.raises(ValueError, match="kv_cache_dtype=fp8 needs a CUDA device"):
        LLMEngine(EngineConfig(model=folder, device="cpu", kv_cache_dtype="fp8"))


# ---- the default model: what int8 KV costs in quality -------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model(default_gguf_path):
    from pernode.serve.models.loader import load_model

    return load_model(default_gguf_path, max_positions=1024)


@torch.inference_mode()
def greedy_tokens(model, prompt_ids: list[int], max_tokens: int, kv_cache_dtype: str) -> list[int]:
    """Prefill then one token per forward through a paged cache of `kv_cache_dtype`, as the engine steps."""
    c, bs = model.config, 16
    total = len(prompt_ids) + max_tokens
    table = contiguous_block_tables(1, total, bs)
    shape = (table.numel(), bs, c.num_key_value_heads, c.head_dim)
    caches = [tuple(allocate_kv_cache(shape, kv_cache_dtype, torch.float32, CPU) for _ in "kv")
              for _ in range(c.num_hidden_layers)]
    ids, new = list(prompt_ids), list(prompt_ids)
    while len(ids) < total:
        start = len(ids) - len(new)
        meta = AttentionMetadata.build(table, [start], [len(new)], bs, CPU)
        logits = model(torch.tensor(new), torch.arange(start, len(ids)), caches, meta,
                       torch.tensor([len(new) - 1]))
        new = [int(logits[-1].argmax())]
        ids += new
    return ids[len(prompt_ids):]


@pytest.mark.slow
def test_int8_kv_same_greedy_tokens_on_readme_prompts(default_model):
    model, source = default_model
    for prompt in ("The capital of France is", "def fib(n):"):  # README's LLM example
        ids = source.tokenizer.encode(prompt)
        assert greedy_tokens(model, ids, 16, "int8") == greedy_tokens(model, ids, 16, "auto")


@pytest.mark.slow
def test_int8_kv_perplexity_change_is_bounded(default_model):
    from pernode.shrink.evaluate.perplexity import evaluate_perplexity

    model, source = default_model
    base = evaluate_perplexity(model, source.tokenizer, seq_len=256, max_windows=1)
    int8 = evaluate_perplexity(model, source.tokenizer, seq_len=256, max_windows=1, kv_cache_dtype="int8")
    assert int8.num_tokens == base.num_tokens == 255
    assert abs(int8.perplexity / base.perplexity - 1) < 0.01  # measured ~0.1% (docs/frontier.md)
