"""Compile every native CPU kernel ahead of time (`make` runs this), so the first request pays no build.

A kernel that fails to build is reported and skipped; pernode then uses its plain-torch reference path.
"""
from __future__ import annotations

import importlib
import logging
import sys

# modules that expose build_kernels() -> Path | None
KERNEL_MODULES = ["pernode.serve.kernels.paged_attention_cpu", "pernode.serve.kernels.quant_linear", "pernode.serve.kernels.layer_ops",
                  "pernode.serve.kernels.dense_linear"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        build = getattr(module, "build_kernels", None)
        if build is None:
            continue
        path = build()
        print(f"{name}: {'built ' + str(path) if path else 'not built, plain-torch fallback in use'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
