"""Compile every native CPU kernel ahead of time (`make` runs this), so the first request pays no build.

A kernel that fails to build is reported and skipped; pernode then uses its plain-torch reference path.
"""
from __future__ import annotations

import logging
import sys

from pernode.serve.kernels import (decoder_stack, dense_linear, layer_ops, paged_attention_cpu, quant_linear,
                                  sparse_linear)

KERNEL_MODULES = (paged_attention_cpu, quant_linear, layer_ops, dense_linear, sparse_linear,
                  decoder_stack)  # each has build_kernels()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for module in KERNEL_MODULES:
        path = module.build_kernels()
        print(f"{module.__name__}: {'built ' + str(path) if path else 'not built, plain-torch fallback in use'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
