"""What a request constrains its output to: a JSON schema, any JSON object, a regex, one of some strings, or a
grammar (Lark or GBNF). The shape of vLLM's `StructuredOutputsParams`; exactly one kind per request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    json: dict | str | None = None  # a JSON schema (object, or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF (llama.cpp's), told apart by `::=`
    # The request field each constraint came from, for error messages (`response_format`, `guided_json`...).
    field_name: str = "structured_outputs"

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"{self.field_name} sets {', '.join(set_kinds) or 'nothing'}: allowed exactly one of "
                             f"{', '.join(KINDS)}")
        kind = set_kinds[0]
        value: Any = getattr(self, kind)
        if kind == "json" and not isinstance(value, (dict, str)):
            raise ValueError(f"{self.field_name}={value!r} is invalid: allowed a JSON schema object")
        if kind in ("regex", "grammar") and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{self.field_name}={value!r} is invalid: allowed a non-empty string")
        if kind == "choice" and not (value and all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"{self.field_name}={value!r} is invalid: allowed a non-empty list of non-empty strings")
        if kind == "json_object" and value is not True:
            raise ValueError(f"{self.field_name}: json_object={value!r} is invalid: allowed True")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))
