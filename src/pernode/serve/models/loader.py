"""Build a model the way the engine serves it: on the meta device, quantized layers swapped in where the checkpoint
says so, then filled from the checkpoint's tensors (no random init, no float copy of a quantized weight)."""
from __future__ import annotations

import torch

from pernode.quant_format import schemes_of
from pernode.serve.models.llama import LlamaForCausalLM
from pernode.serve.models.registry import ModelSource, resolve_model


def build_model(source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                max_positions: int = 4096) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config, max_positions=max_positions)
        if source.quantization_config:
            model.apply_quantization(*schemes_of(source.quantization_config))
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset_cache()
    model.tie_weights()
    model.load_weights(source.iter_tensors(dtype=dtype, device=device))
    return model.eval()


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, max_positions: int | None = None
               ) -> tuple[LlamaForCausalLM, ModelSource]:
    """(model, source) on the CPU, as the engine builds it: what quantizers, evaluators and benchmarks start from."""
    source = resolve_model(name_or_path)
    return build_model(source, "cpu", dtype, max_positions or 4096), source
