"""What every quantization method is: a frozen dataclass of its own options, validated on construction, that
rewrites a model's projections in place (llm-compressor's modifiers: `GPTQ(damp_ratio=0.01)`, not "gptq" plus
a bag of keyword arguments that a method may silently drop)."""
from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

import torch

from pernode.quant_format import QuantScheme
from pernode.shrink.methods.common import check_model


class Modifier:
    """Base of the method dataclasses. A subclass sets `name`, declares its options as dataclass fields, checks
    them in `__post_init__` (errors name the field and the allowed range) and implements `apply`."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False  # True: `apply` gets calibration windows (token ids [S, L])
    required_scheme: ClassVar[QuantScheme | None] = None  # the one scheme a method runs (W8A8 family), or any

    def apply(self, model, scheme: QuantScheme, calibration: torch.Tensor | None, quiet: bool) -> dict:
        """Quantize `model`'s decoder projections in place; returns the method's report (JSON-able)."""
        raise NotImplementedError

    def check_scheme(self, scheme: QuantScheme) -> None:
        required = self.required_scheme
        if required is not None and dataclasses.replace(scheme, outlier_threshold=None) != required:
            raise ValueError(f"scheme={scheme.label()}: method {self.name} runs int8 symmetric per-channel weights "
                             f"with dynamic per-token int8 activations: allowed {required.label()} only")

    def weight_observer(self) -> str:
        """compressed-tensors' `observer` of the weights: how the group scales were chosen."""
        return "minmax"

    def options(self) -> dict:
        """The method's fields, enums as their values (what `to_dict` writes besides the method's name)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict:
        return {"method": self.name, **self.options()}


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def option_names(cls: type[Modifier]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def require(ok: bool, field: str, value, allowed: str) -> None:
    """The one form of an option's error: `damp_ratio=-1: allowed > 0`."""
    if not ok:
        raise ValueError(f"{field}={value!r}: allowed {allowed}")


def quantize_model(model, modifier: Modifier, scheme: QuantScheme, calibration: torch.Tensor | None = None,
                   quiet: bool = False) -> dict:
    """Quantize `model` in place with `modifier`; returns the method's report (e.g. LLM.int8() outlier counts)."""
    if not isinstance(modifier, Modifier):
        raise TypeError(f"modifier={modifier!r}: allowed a method object such as RTN() or GPTQ(damp_ratio=0.01) "
                        "(pernode.shrink.methods.method_named looks one up by name)")
    if modifier.needs_calibration and calibration is None:
        raise ValueError(f"method {modifier.name!r} needs calibration windows (token ids [S, L])")
    modifier.check_scheme(scheme)
    check_model(model, scheme)  # fail before any work when a layer's shape does not fit the scheme
    return modifier.apply(model, scheme, calibration, quiet)

