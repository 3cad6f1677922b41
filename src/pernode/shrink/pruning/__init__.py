"""The pruning methods, one module each, every one a `Pruner` dataclass of its own options; looked up by the name a
checkpoint's recipe or the command line gives."""
from __future__ import annotations

import dataclasses

from pernode.shrink.pruning.magnitude import Magnitude
from pernode.shrink.pruning.pruner import Layerwise, Pruner
from pernode.shrink.pruning.sparsegpt import SparseGPT
from pernode.shrink.pruning.wanda import Wanda

PRUNERS: dict[str, type[Pruner]] = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT)}


def pruner_named(name: str, **options) -> Pruner:
    """`pruner_named("sparsegpt", sparsity=0.5, pattern="2:4")`; an option the method does not take is an error."""
    if name not in PRUNERS:
        raise ValueError(f"method={name!r} is not a pruning method: allowed {', '.join(PRUNERS)}")
    cls = PRUNERS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for option in options:
        if option not in fields:
            takers = [n for n, c in PRUNERS.items() if option in [f.name for f in dataclasses.fields(c)]]
            where = f"it is an option of {', '.join(takers)}" if takers else "no pruning method takes it"
            raise ValueError(f"pruning method {name!r} has no option {option!r} ({where}): allowed {', '.join(fields)}")
    return cls(**options)


def pruner_from_dict(d: dict) -> Pruner:
    """Inverse of `Pruner.to_dict`."""
    options = dict(d)
    return pruner_named(options.pop("method", None), **options)


__all__ = ["Layerwise", "Magnitude", "PRUNERS", "Pruner", "SparseGPT", "Wanda", "pruner_from_dict", "pruner_named"]
