"""pernode: what one LLM-serving node does with a request, made measurable, smaller and priced."""
from pernode.serve.sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # torch-heavy classes load on first use so `pernode --help` stays fast
    if name == "LLM":
        from pernode.serve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pernode.serve.engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
