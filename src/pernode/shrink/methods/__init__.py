"""The quantization methods, one module each, every one a `Modifier` dataclass of its own options; looked up by
the name a checkpoint or the command line gives."""
from __future__ import annotations

from pernode.shrink.methods.awq import AWQ
from pernode.shrink.methods.gptq import GPTQ
from pernode.shrink.methods.llm_int8 import LLMInt8
from pernode.shrink.methods.modifier import Modifier, option_names, quantize_model
from pernode.shrink.methods.rtn import RTN
from pernode.shrink.methods.smoothquant import SmoothQuant
from pernode.shrink.methods.w8a8 import W8A8

METHODS: dict[str, type[Modifier]] = {cls.name: cls for cls in (RTN, GPTQ, AWQ, SmoothQuant, W8A8, LLMInt8)}


def method_class(name: str) -> type[Modifier]:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown: allowed {', '.join(METHODS)}")
    return METHODS[name]


def methods_taking(option: str) -> list[str]:
    """The names of the methods that have `option` among their fields."""
    return [name for name, cls in METHODS.items() if option in option_names(cls)]


def method_named(name: str, **options) -> Modifier:
    """`method_named("gptq", damp_ratio=0.05)` == `GPTQ(damp_ratio=0.05)`; an option the method does not take is
    an error naming the methods that do."""
    cls = method_class(name)
    for option in options:
        if option not in option_names(cls):
            takers = methods_taking(option)
            where = f"it is an option of {', '.join(takers)}" if takers else "no method takes it"
            raise ValueError(f"method {name!r} has no option {option!r} ({where}): allowed "
                             f"{', '.join(option_names(cls)) or 'none'}")
    return cls(**options)


def modifier_from_dict(d: dict) -> Modifier:
    """Inverse of `Modifier.to_dict`: {"method": "gptq", "damp_ratio": 0.01, ...}."""
    options = dict(d)
    return method_named(options.pop("method", None), **options)


__all__ = ["AWQ", "GPTQ", "LLMInt8", "METHODS", "Modifier", "RTN", "SmoothQuant", "W8A8", "method_class",
           "method_named", "methods_taking", "modifier_from_dict", "quantize_model"]
