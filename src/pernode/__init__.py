"""pernode: what one LLM-serving node does with a request, made measurable, smaller and priced."""
from pernode.serve.sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # lazy (PEP 562): every `import pernode.x` runs this file, and the planner or the bench client must not pay
    # for torch and the model code just because the package exports the engine
    if name == "LLM":
        from pernode.serve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pernode.serve.engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
