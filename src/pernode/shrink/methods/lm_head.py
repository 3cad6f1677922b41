"""The output projection, quantized on request: a recipe's step after its method (`Recipe.lm_head`,
`pernode quantize --quantize-lm-head`).

On a small model the lm_head dominates what a decode step reads: SmolLM2-135M's is 49152 x 576 = 113 MB in fp32,
twice its whole int4 decoder. It stays float by default (compressed-tensors' `ignore: ["lm_head"]`, the usual
choice: logits are sensitive); quantized, it is untied from the embedding (which stays float for the lookup) and
stored int8 per group of 32, which is exactly what GGUF's Q8_0 keeps — lossless when the source embedding is Q8_0,
as the packaged SmolLM2's is.
"""
from __future__ import annotations

import dataclasses

import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.shrink.methods.common import install

LM_HEAD_SCHEME = QuantScheme(num_bits=8, group_size=32)


@torch.no_grad()
def quantize_lm_head(model, scheme: QuantScheme = LM_HEAD_SCHEME) -> None:
    """Replace the (possibly tied) float lm_head by a quantized copy, in place; the embedding stays float."""
    scheme.check_shape("lm_head", model.lm_head.in_features)
    weight = model.lm_head.weight.data.float()
    install(model, "lm_head", *quantize_weight(weight, scheme), scheme, "lm_head")
    if model.config.tie_word_embeddings:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)

