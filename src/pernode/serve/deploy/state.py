"""Where a detached fleet is recorded, so that `pernode fleet down` finds what `pernode fleet up --detach` started.

One JSON file per user: the owner's pid, the URL, the application, the Ray address and the processes a local Ray
started. Beside it, the spec the owner process reads (`.spec.json`) and its log (`.log`).
"""
from __future__ import annotations

import json

from pernode import envs

STATE_FILE = envs.fleet_state_path()
SPEC_FILE = STATE_FILE.with_suffix(".spec.json")
LOG_FILE = STATE_FILE.with_suffix(".log")


def read_state() -> dict:
    """The recorded fleet; {} when none is."""
    return json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}


def write_state(state: dict) -> None:
    STATE_FILE.write_text(json.dumps(state) + "\n")


def clear_state() -> None:
    STATE_FILE.unlink(missing_ok=True)
    SPEC_FILE.unlink(missing_ok=True)
