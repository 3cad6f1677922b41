from pernode.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
