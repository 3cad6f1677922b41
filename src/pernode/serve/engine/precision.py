"""The start-up line that says in what precision the engine computes and stores weights, why, and where the quality
cost of that choice is measured (never a remembered figure: the measurement is a command anyone can rerun)."""
from __future__ import annotations

import torch

from pernode.serve.kernels.cpu_features import native_bf16_flags

QUALITY_COMMAND = "pernode eval ppl --quick --dtype float32|bfloat16 --gguf-weights native|float"


def describe_precision(dtype: torch.dtype, requested: str | None, device: torch.device, source_format: str,
                       gguf_weights: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if requested is not None:
        why = "as asked (--dtype)"
    elif device.type != "cpu":
        why = f"the default on {device.type}"
    else:
        flags = native_bf16_flags()
        why = (f"this CPU computes bf16 natively ({', '.join(flags)})" if flags
               else "this CPU has no native bf16 (no AVX512_BF16 or AMX)")
    parts = [f"compute dtype {name}: {why}; --dtype float32 or bfloat16 chooses"]
    if source_format == "gguf":
        parts.append("GGUF weights " + ("served at their own precision (int4/int8 kernels); --gguf-weights float "
                                        "dequantizes them" if gguf_weights == "native"
                                        else f"dequantized to {name} (--gguf-weights native keeps them)"))
    parts.append(f"quality cost of these choices: `{QUALITY_COMMAND}` (measured figures: docs/benchmarks.md)")
    return "; ".join(parts)
