from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.structured.spec import StructuredOutputs

__all__ = ["SamplingParams", "StructuredOutputs"]
