"""Typed records and the files that hold them: one rule each for reading a JSON or JSONL file (errors name the file
and line), checking a dict against a dataclass's fields, range-checking a setting, and guessing a token count from
text when no tokenizer is at hand. Core: imports nothing of pernode."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

CHARS_PER_TOKEN = 4.0  # the usual English BPE ratio; only for text no tokenizer has counted


def estimate_tokens(text: str) -> int:
    # rounded up: a planner sizing KV and step time from it must not under-count
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The parsed JSON of `path`; a ValueError names the file (`plan file p.json: not valid JSON (...)`)."""
    where = f"{what} {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(`path line N`, object) for each non-blank line of a JSON Lines file; each line must be one JSON object."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            yield where, row


def known_fields(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`d` as keyword arguments of the dataclass `cls`; a ValueError lists unknown keys and the allowed ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}: allowed {names}")
    return dict(d)


def check_range(name: str, value: Any, low: float, high: float | None = None, *, optional: bool = False,
                integer: bool = True) -> None:
    """ValueError `name=value is out of range: allowed low..high` unless low <= value <= high (None passes when
    `optional`)."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, kinds) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return
    allowed = f"{low}..{high}" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value!r} is out of range: allowed {'None or ' if optional else ''}{allowed}")
