"""Building and loading the native CPU kernels (csrc/*.cpp) as torch JIT extensions, cached per binary.

Each kernel is compiled on first use (or ahead of time by `make`, see build.py) for this very CPU with
-march=native, into ~/.cache/pernode/kernels/<name>_<hash>, the hash keyed by everything that changes the binary:
source, its path, flags, torch version, CPU. The sources register their ops with torch's dispatcher (`torch.ops.pernode.*`),
so no pybind11/Python headers are compiled. A kernel that cannot build logs one warning and its caller falls back
to plain torch.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import re
from pathlib import Path

import torch

from pernode import envs

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -ffp-contract=off: the compiler never fuses a scalar a * b + c into an FMA on its own (the kernels' explicit FMA
# intrinsics stay). Left to it, GCC fuses differently in each row count's instantiation of a GEMV (MB = 1, 2, 3, ...)
# where it vectorises across the rows, so on a CPU without AVX-512 (the scalar paths) a row's result depended on the
# rows beside it, and a speculative verify step's rows were no longer their decodes' bit for bit.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"', re.MULTILINE)


def cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))
    except OSError:
        return platform.processor() + platform.machine()


def local_includes(source: str) -> list[Path]:
    """csrc/<source> and the csrc headers it includes ("name.h"), transitively: everything its binary is built from."""
    seen: list[Path] = []
    pending = [CSRC / source]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.append(path)
        pending.extend(CSRC / name for name in LOCAL_INCLUDE.findall(path.read_text()) if (CSRC / name).exists())
    return seen


def build_name(source: str) -> str:
    """pernode_<source stem>_<hash of source and its headers, its path, flags, torch version, CPU>. The path is in
    the key because torch's builder records it: two checkouts sharing one build folder would rebuild (and rewrite
    the .so under each other) every time the other one loads."""
    path = CSRC / source
    h = hashlib.sha256()
    for part in ([f.read_bytes() for f in local_includes(source)]
                 + [str(path.resolve()).encode(), " ".join(CFLAGS).encode(), torch.__version__.encode(),
                    cpu_signature().encode()]):
        h.update(part)
        h.update(b"\0")
    return f"pernode_{path.stem}_{h.hexdigest()[:16]}"


# source -> whether it loaded: what traced code reads (see load_extension)
_LOADED: dict[str, bool] = {}


def load_extension(source: str) -> bool:
    """Build (if needed) and load csrc/<source>, registering its torch.ops.pernode.* ops; False if it failed.
    Under torch.compile's tracing it only reads the answer of an earlier eager call: tracing into the build (file
    hashing, the compiler) would break the graph at every layer."""
    if torch.compiler.is_compiling():
        return _LOADED.get(source, False)
    return _load_extension_once(source)


@functools.lru_cache(maxsize=None)
def _load_extension_once(source: str) -> bool:
    _LOADED[source] = _build_and_load(source)
    return _LOADED[source]


def _build_and_load(source: str) -> bool:
    try:
        # imported here: it pulls in setuptools (~0.15 s), and a missing toolchain must only cost the fast path
        from torch.utils import cpp_extension

        name = build_name(source)
        build_dir = envs.kernel_cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(CSRC / source)], extra_cflags=list(CFLAGS),
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
        return True
    except Exception as exc:  # a missing compiler or ninja must not stop serving: the references still work
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("pernode: C++ kernels in %s unavailable (%s); using the plain-torch reference", source, reason)
        return False


def build_path(source: str) -> Path | None:
    """Build csrc/<source> now and return its build folder, or None if it failed (for `make`)."""
    return envs.kernel_cache_dir() / build_name(source) if load_extension(source) else None
