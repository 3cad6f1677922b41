"""The sampled rows' final norm and lm_head run in fp32 in a bf16 model (serve/models/fp32_logits.py): held to a
plain fp32 computation, with the Q8_0-style lm_head keeping float activations; and on the default model the chat
question a bf16 near-tie used to flip is answered as fp32 answers it."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.kernels.dense_linear import Linear
from pernode.serve.kernels.layer_ops import rms_norm_reference
from pernode.serve.kernels.quant_linear import QuantLinear, woq_linear_reference
from pernode.serve.models.fp32_logits import runs_in_fp32, sampled_logits
from pernode.serve.models.llama import RMSNorm


def _norm(hidden: int) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    return norm


def test_quantized_lm_head_gets_fp32_rows_and_gives_fp32_logits(monkeypatch):
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "100000")  # the decode GEMV, without measuring a crossover
    torch.manual_seed(0)
    hidden, vocab = 96, 131  # ragged: vocab off every tile size
    head = QuantLinear(hidden, vocab, QuantScheme(8, 32))
    q, scale, _ = quantize_weight(torch.randn(vocab, hidden), QuantScheme(8, 32))
    head.set_quantized(q, scale, None)
    norm = _norm(hidden).to(torch.bfloat16)
    head.to(torch.bfloat16)
    x = torch.randn(5, hidden).to(torch.bfloat16)
    assert runs_in_fp32(head)
    logits = sampled_logits(norm, head, x)
    assert logits.dtype == torch.float32
    want = woq_linear_reference(rms_norm_reference(x.float(), norm.weight.float(), 1e-5), head.qweight,
                                head.weight_scale, None, 8, 32)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # the old path rounded the norm's output and the logits to bf16: visibly further from fp32
    old = head(norm(x)).float()
    assert (old - want).abs().max() > 10 * (logits - want).abs().max()


def test_fp32_and_dense_bf16_heads():
    torch.manual_seed(1)
    norm, head = _norm(64), Linear(64, 50, bias=False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(sampled_logits(norm, head, x), head(norm(x)))  # fp32 model: unchanged
    norm16, head16 = norm.to(torch.bfloat16), head.to(torch.bfloat16)
    assert not runs_in_fp32(head16)  # no fp32 copy of a dense bf16 table: it stays on the bf16 path
    got = sampled_logits(norm16, head16, x.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, head16(norm16(x.bfloat16())).float())


@pytest.mark.slow
def test_default_model_answers_the_chat_question_as_fp32_does(default_gguf_path, monkeypatch):
    """SmolLM2's first token for this question is a near-tie in fp32 ('The' -1.883, 'L' -1.965 nats) that bf16
    logits rounded into an exact tie. The prompt (178 tokens) runs through the GEMM here: the int4 GEMV's int8
    activations are a separate, larger perturbation (docs/threads.md, "GEMV or GEMM")."""
    from pernode import LLM, SamplingParams

    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=8)
    llm = LLM(default_gguf_path, max_model_len=256, num_blocks=16)
    text = llm.tokenizer.decode(llm.chat(chat, params)[0].outputs[0].token_ids)
    assert text.startswith("The capital of France is Paris"), text
