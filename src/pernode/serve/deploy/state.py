"""Where a detached fleet is recorded, so that `pernode fleet down` finds what `pernode fleet up --detach` started.

One JSON file per user (`envs.fleet_state_path()`): the owner process and the processes a local Ray started (each
a `ProcessRecord`: pid, start time, uid, command line), the URL, the application and the Ray address. Beside it,
the spec the owner process reads (`.spec.json`, never the API key: that travels in the owner's environment) and
its log (`.log`).

The folder is private (created 0700, refused when another user owns it or may write to it without the sticky
bit); every file is created 0600 by `os.open` (never chmod after), written whole and renamed into place, and read
only when it is a regular file (not a link) owned by this user that no one else may write.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pernode import envs


def state_file() -> Path:
    return envs.fleet_state_path()


def spec_file() -> Path:
    return state_file().with_suffix(".spec.json")


def log_file() -> Path:
    return state_file().with_suffix(".log")


def private_dir() -> Path:
    """The state file's folder, created 0700 when missing; ValueError when it is not safe to keep state in."""
    folder = state_file().parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid not in (os.getuid(), 0):
        raise ValueError(f"fleet state folder {folder} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): "
                         f"refusing to keep fleet state there; set PERNODE_FLEET_STATE to a file in a folder of yours")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"fleet state folder {folder} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                         f"refusing to keep fleet state there; `chmod 700 {folder}` or set PERNODE_FLEET_STATE")
    return folder


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` as a new 0600 file, atomically (a reader sees the old file or the whole new one)."""
    private_dir()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def open_private_log(path: Path):
    """A new 0600 file at `path` (an old one is replaced), open for writing."""
    private_dir()
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w")


def read_private(path: Path) -> str | None:
    """The text of `path`; None when it does not exist. ValueError, naming the file, when it is a link, not a
    regular file, owned by another user, or writable by group or others: such a file may name anyone's processes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link
        raise ValueError(f"fleet state file {path} cannot be opened safely ({exc.strerror}): refusing it") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"fleet state file {path} is not a regular file: refusing it")
        if st.st_uid != os.getuid():
            raise ValueError(f"fleet state file {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): "
                             f"refusing to act on it")
        if st.st_mode & 0o022:
            raise ValueError(f"fleet state file {path} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): refusing to act on it; remove it")
        return f.read()


def read_state() -> dict:
    """The recorded fleet; {} when none is."""
    path = state_file()
    text = read_private(path)
    if text is None:
        return {}
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"fleet state file {path} is not JSON ({exc}); remove it") from None
    if not isinstance(state, dict):
        raise ValueError(f"fleet state file {path} holds {type(state).__name__}, expected an object; remove it")
    return state


def write_state(state: dict) -> None:
    write_private(state_file(), json.dumps(state) + "\n")


def clear_state() -> None:
    state_file().unlink(missing_ok=True)
    spec_file().unlink(missing_ok=True)
