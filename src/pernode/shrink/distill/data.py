"""Offline, real training text for distillation, split deterministically, with its provenance written down.

Sources (every Python installation has them; nothing is downloaded):
  pydoc      the calibration part of `pydoc_data.topics` (the first 10%, shrink/evaluate's split); the other 90% is
             the fixed perplexity protocol's evaluation text and is never trained on.
  stdlib     the standard library's own .py files (source and docstrings) under sysconfig's `stdlib` path, without
             site-/dist-packages, test suites and __pycache__. A file is held out for evaluation when the SHA-1 of its
             relative path is 0 mod 20 (~5%), so the split does not depend on the file set or the seed. Either whole
             files (mostly code) or their docstrings only (~1.5 MB of English prose, the nearest text to pydoc's).
  packages   on request, the docstrings of installed PyPI packages (numpy, torch, networkx, ...: the project's own
             dependencies, so the text comes from the package registry), each named with its version and license.
  seq-kd     the teacher's own generations for chat prompts (Kim & Rush 2016), added by `sequence_kd`.
The seed only decides which training files fill the token budget and the order of windows.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field

import torch

from pernode.shrink.evaluate.perplexity import corpus_text, split_corpus

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
HELDOUT_MODULUS = 20
STDLIB_TEXTS = ("files", "docstrings", "none")  # "none": no stdlib training text (the held-out files stay)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted (the walk order of a filesystem is not deterministic)."""
    return python_files(root or stdlib_root())


def python_files(root: str) -> list[str]:
    """Relative paths of the .py files under `root`, without test suites and caches, sorted."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    return sorted(found)


def is_heldout(relative_path: str) -> bool:
    return int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


@dataclass
class DistillationText:
    """Training documents and held-out documents (lists of strings) and where they came from."""

    train: list[str]
    heldout: list[str]
    provenance: dict = field(default_factory=dict)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def docstrings(source: str) -> str:
    """The module's, classes' and functions' docstrings of one Python file, in source order, blank-line separated
    ("" when the file does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                         ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


def package_sources(names: tuple[str, ...]) -> dict[str, dict]:
    """For each installed package: its directory, distribution, version and license (ValueError naming the package
    when it is not installed or is a single module)."""
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for name in names:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"docstring_packages: {name!r} is not an installed package (give import names, "
                             f"e.g. numpy,torch,networkx)")
        dist = (distributions.get(name) or [name])[0]
        meta = importlib.metadata.metadata(dist)
        found[name] = {"root": list(spec.submodule_search_locations)[0], "distribution": dist,
                       "version": meta.get("Version"),
                       "license": meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0][:80]}
    return found


def _read_until(root: str, files: list[str], max_chars: int, stdlib_text: str = "files"
                ) -> tuple[list[str], list[str]]:
    """Texts of `files` in order (unreadable or blank ones skipped) until at least `max_chars`; and which files.
    stdlib_text="docstrings" keeps each file's docstrings only. `root` may be "" when the files are absolute."""
    texts, used, total = [], [], 0
    for rel in files:
        if total >= max_chars:
            break
        text = _read(os.path.join(root, rel))
        if text and stdlib_text == "docstrings":
            text = docstrings(text)
        if text and text.strip():
            texts.append(text)
            used.append(rel)
            total += len(text)
    return texts, used


def distillation_text(train_chars: int, heldout_chars: int = 200_000, seed: int = 0,
                      root: str | None = None, stdlib_text: str = "files",
                      docstring_packages: tuple[str, ...] = ()) -> DistillationText:
    """About `train_chars` characters of training text (pydoc calibration part first, then stdlib files in seeded
    order, whole, their docstrings only or none; then the docstrings of `docstring_packages`' files in seeded order)
    and up to `heldout_chars` of held-out stdlib files, in path order. With docstrings there are fewer characters
    than a large budget asks for: the caller sees it in the window count."""
    if stdlib_text not in STDLIB_TEXTS:
        raise ValueError(f"stdlib_text={stdlib_text!r} is not allowed: one of {', '.join(STDLIB_TEXTS)}")
    root = root or stdlib_root()
    files = stdlib_files(root)
    train_files = [f for f in files if not is_heldout(f)]
    heldout_files = [f for f in files if is_heldout(f)]
    random.Random(seed).shuffle(train_files)
    pydoc_train = split_corpus(corpus_text())[0]
    stdlib_train, used = ([], []) if stdlib_text == "none" else _read_until(
        root, train_files, train_chars - len(pydoc_train), stdlib_text)
    heldout, heldout_used = _read_until(root, heldout_files, heldout_chars)
    packages = package_sources(docstring_packages)
    labels = {os.path.join(info["root"], rel): f"{name}/{rel}"  # "numpy/linalg/_linalg.py": the same on every machine
              for name, info in packages.items() for rel in python_files(info["root"])}
    package_files = list(labels)
    random.Random(seed).shuffle(package_files)
    budget = train_chars - len(pydoc_train) - sum(map(len, stdlib_train))
    package_train, package_used = _read_until("", package_files, budget, "docstrings") if packages else ([], [])
    package_used = [labels[path] for path in package_used]
    train = [pydoc_train] + stdlib_train + package_train
    held = sum(map(len, heldout))
    provenance = {
        "python": sys.version.split()[0],
        "pydoc": {"source": "pydoc_data.topics (Python stdlib), topics joined in sorted-key order",
                  "used": "first 10% (the calibration split of shrink/evaluate); the other 90% is the perplexity "
                          "evaluation text and is never trained on", "chars": len(pydoc_train)},
        "stdlib": {"root": root, "text": stdlib_text, "excluded_dirs": sorted(EXCLUDED_DIRS),
                   "files_total": len(files),
                   "heldout_rule": f"sha1(relative path) % {HELDOUT_MODULUS} == 0",
                   "train_files_used": len(used), "train_chars": sum(map(len, stdlib_train)),
                   "heldout_files_used": len(heldout_used), "heldout_chars": held, "seed": seed,
                   "train_files_sha1": hashlib.sha1("\n".join(used).encode()).hexdigest()},
        "license": "Python Software Foundation License (the CPython distribution's documentation and source)",
    }
    if packages:
        provenance["packages"] = {
            "text": "docstrings of the installed packages' .py files (test suites excluded), files in seeded order",
            "installed_from": "the package registry (the project's own dependencies, installed by `make install`)",
            "versions": {info["distribution"]: info["version"] for info in packages.values()},
            "licenses": {info["distribution"]: info["license"] for info in packages.values()},
            "files_used": len(package_used), "chars": sum(map(len, package_train)),
            "files_sha1": hashlib.sha1("\n".join(package_used).encode()).hexdigest()}
    return DistillationText(train, heldout, provenance)


def pack_windows(documents: list[list[int]], seq_len: int, separator: int | None) -> torch.Tensor:
    """Token documents laid end to end (separated by `separator`, e.g. EOS) and cut into [N, seq_len] windows; the
    trailing partial window is dropped."""
    stream: list[int] = []
    for doc in documents:
        stream += doc
        if separator is not None:
            stream.append(separator)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the training text has {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def shuffled_windows(windows: torch.Tensor, seed: int) -> torch.Tensor:
    """Windows in a seeded order, so packing order (pydoc, files, generations) does not become batch order."""
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]
