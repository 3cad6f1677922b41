from pernode.serve.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
