"""--compile: the torch.compile'd forward gives the eager forward's greedy tokens (tiny model; the default model is
checked by benchmarks/compile.py), every C++ op has a shape function, and the cache goes to pernode's folder."""
from __future__ import annotations

import pytest
import torch

from pernode import LLM, SamplingParams
from pernode.serve.kernels.jit import load_extension
from pernode.serve.kernels.op_fakes import FAKES, register_fake_ops
from pernode.serve.models.compiled import is_compiled
from tiny_model import write_tiny_model

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.mark.slow  # compiles a (tiny) decoder layer: tens of seconds on 2 cores
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])  # int8: K/V quantized on the way in, in the graph
def test_compiled_forward_gives_eager_greedy_tokens(tiny_dir, tmp_path, monkeypatch, kv_cache_dtype):
    monkeypatch.setenv("PERNODE_COMPILE_CACHE", str(tmp_path / "inductor"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    eager = LLM(tiny_dir, num_blocks=64, max_model_len=256, kv_cache_dtype=kv_cache_dtype)
    compiled = LLM(tiny_dir, num_blocks=64, max_model_len=256, compile=True, kv_cache_dtype=kv_cache_dtype)
    assert compiled.engine.compile_time_s is not None and eager.engine.compile_time_s is None
    assert is_compiled(compiled.engine.model) and not is_compiled(eager.engine.model)
    want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    got = [o.outputs[0].token_ids for o in compiled.generate(PROMPTS, params)]
    assert got == want
    assert (tmp_path / "inductor").is_dir() and any((tmp_path / "inductor").iterdir())
    compiled.engine.kv.check_no_leak()


def test_every_cpp_op_has_a_shape_function_that_matches_it():
    sources = ("layer_ops.cpp", "paged_attention.cpp", "dense_gemv.cpp")
    ops = register_fake_ops(sources)
    loaded = [src for src in sources if load_extension(src)]
    assert set(ops) >= {name for src in loaded for name in FAKES[src]}
    if "layer_ops.cpp" in loaded:
        from torch._subclasses.fake_tensor import FakeTensorMode

        x, w = torch.randn(3, 8), torch.rand(8)
        with FakeTensorMode() as mode:
            fx, fw = mode.from_tensor(x), mode.from_tensor(w)
            total, normed = torch.ops.pernode.add_rms_norm(fx, fx, fw, 1e-6)
            gated = torch.ops.pernode.silu_and_mul(fx)
        real_total, real_normed = torch.ops.pernode.add_rms_norm(x, x, w, 1e-6)
        assert total.shape == real_total.shape and normed.dtype == real_normed.dtype
        assert gated.shape == torch.ops.pernode.silu_and_mul(x).shape == (3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_decode_matches_eager(tiny_dir):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eager = LLM(tiny_dir, num_blocks=64, max_model_len=256, device="cuda", dtype="float32")
    compiled = LLM(tiny_dir, num_blocks=64, max_model_len=256, device="cuda", dtype="float32", compile=True)
    want = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    assert [o.outputs[0].token_ids for o in compiled.generate(PROMPTS, params)] == want


def test_report_section_shows_the_ratio_or_why_it_is_missing():
    from pernode.jobs.compare_compiled import compiled_section

    assert "skipped in --quick" in compiled_section(None)["text"]
    section = compiled_section({"compile_time_s": 50.0, "greedy_identical": True, "context": 256,
                                "rows": [{"batch": 1, "eager_ms": 10.0, "compiled_ms": 8.0}]})
    assert section["rows"] == [[1, 10.0, 8.0, 1.25]] and "warm-up 50.0 s" in section["title"]
