"""The quality cost of the serving precision, measured in the run that reports it: perplexity of one model on the
same held-out windows in fp32 on dequantized weights (the reference), bf16 on dequantized weights, and each on a
GGUF's own int4/int8 weights. Never a remembered figure: `pernode report` measures it, `pernode eval ppl --dtype
... --gguf-weights ...` does one configuration."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.evaluate.perplexity import evaluate_perplexity

# (dtype, gguf_weights): the reference first
CONFIGS = (("float32", "float"), ("bfloat16", "float"), ("float32", "native"), ("bfloat16", "native"))


@dataclass(frozen=True)
class PrecisionQuality:
    dtype: str
    gguf_weights: str
    perplexity: float
    num_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_precision_quality(model: str, windows: int = 2, seq_len: int = 512,
                              configs: tuple[tuple[str, str], ...] = CONFIGS, progress=None) -> list[PrecisionQuality]:
    """Perplexity per (dtype, gguf_weights); for a non-GGUF model the gguf_weights variants are the same model,
    so only the float ones run."""
    rows = []
    for dtype, weights in configs:
        net, source = load_model(model, dtype=getattr(torch, dtype), max_positions=seq_len, gguf_weights=weights)
        if source.format != "gguf" and weights == "native":
            continue
        result = evaluate_perplexity(net, source.tokenizer, seq_len=seq_len, max_windows=windows)
        rows.append(PrecisionQuality(dtype, weights, result.perplexity, result.num_tokens))
        if progress:
            progress(rows[-1])
        del net
    return rows


def precision_section(rows: list[PrecisionQuality]) -> dict:
    """The report's table: each configuration's perplexity and its change against the first (fp32, dequantized)."""
    base = rows[0]
    return {"title": f"Serving precision: perplexity on held-out pydoc text ({base.num_tokens} predictions), "
                     "against fp32 on dequantized weights",
            "columns": ["compute dtype", "GGUF weights", "perplexity", "Δ ppl"],
            "rows": [[r.dtype, r.gguf_weights, round(r.perplexity, 4),
                      f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%"] for r in rows]}
