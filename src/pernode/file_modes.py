"""File modes: what the user's umask gives a new file. Files written through `tempfile.mkstemp` (always 0600)
and renamed into place take it, so a profile or a report is as readable as any file the user makes; secrets (fleet
state, serve/deploy/state.py) keep 0600 on purpose."""
from __future__ import annotations

import os


def user_file_mode() -> int:
    """0o666 less the umask: 0644 under the usual 022."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask
