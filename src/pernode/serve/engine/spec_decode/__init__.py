"""Speculative decoding inside the engine: proposers (prompt lookup, a draft model), exact verification by
rejection sampling, and the measured-cost rule that picks how many tokens each request proposes."""
from pernode.serve.engine.spec_decode.spec_stats import SpecDecodeStats
from pernode.serve.engine.spec_decode.speculator import Speculator

__all__ = ["SpecDecodeStats", "Speculator"]
