"""Offline throughput of pernode against HF transformers `generate` (static batches), measured in one run.

128 requests, prompt lengths uniform 32-512, output lengths uniform 16-256 (seeded, ignore_eos), all submitted
at once. Prints each system's output tokens/s and pernode's ratio. Usage:

    .venv/bin/python benchmarks/offline_throughput.py [--num-prompts 128] [--peers hf,llama.cpp] [engine flags]
"""
import argparse
import logging
import sys

from pernode.cli.bench import add_offline_arguments, offline_config_from_args
from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.measure.bench.bench_offline import print_results, run_bench_offline
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.models.registry import resolve_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_offline_arguments(parser)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = offline_config_from_args(args)
    engine = LLMEngine(engine_config_from_args(args))
    results = run_bench_offline(LLM.from_engine(engine), resolve_model(args.model), config)
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
