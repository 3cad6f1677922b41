"""Build llama.cpp's own `llama-server` and `llama-bench` once, from the source the llama-cpp-python sdist vendors.

The sdist comes from PyPI through pip (`pip download llama-cpp-python --no-deps --no-binary :all:`); cmake builds
the two tools into ~/.cache/pernode/llama.cpp (or $PERNODE_LLAMA_CPP_DIR). Nothing here runs inside `make test`.
A second call finds the binaries and returns at once. Usage:

    .venv/bin/python benchmarks/llama_cpp_build.py [--jobs 2] [--version 0.3.36]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = ("llama-server", "llama-bench")


def cache_dir() -> Path:
    return Path(os.environ.get("PERNODE_LLAMA_CPP_DIR", Path.home() / ".cache" / "pernode" / "llama.cpp"))


def tool_path(name: str) -> Path:
    return cache_dir() / "bin" / name


def built() -> bool:
    return all(tool_path(t).exists() for t in TOOLS)


def download_sdist(version: str | None) -> Path:
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if have and version is None:
        return have[-1]
    spec = "llama-cpp-python" + (f"=={version}" if version else "")
    print(f"downloading the {spec} sdist from PyPI", flush=True)
    # pip prepares the sdist's metadata before saving it, which needs its build backend (scikit-build-core): with
    # build isolation pip fetches that from the registry instead of requiring it in this environment
    subprocess.run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", ":all:",
                    "-d", str(dest)], check=True)
    return sorted(dest.glob("llama_cpp_python-*.tar.gz"))[-1]


def unpack_llama_cpp(sdist: Path) -> Path:
    """The sdist holds llama.cpp under vendor/llama.cpp; unpack just that tree (kept when it is there already, so
    an interrupted build resumes where it stopped)."""
    src_root = cache_dir() / "src"
    unpacked = src_root / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if (unpacked / "CMakeLists.txt").exists():
        return unpacked
    if src_root.exists():
        shutil.rmtree(src_root)
    src_root.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(src_root, members=members, filter="data")
    (top,) = [p for p in src_root.iterdir() if p.is_dir()]
    return top / "vendor" / "llama.cpp"


def build(jobs: int, version: str | None) -> None:
    if built():
        print(f"llama.cpp tools already built in {cache_dir() / 'bin'}")
        return
    if shutil.which("cmake") is None:
        raise SystemExit("cmake not found: install it (e.g. `.venv/bin/pip install cmake`) and retry")
    source = unpack_llama_cpp(download_sdist(version))
    build_dir = cache_dir() / "build"
    # GGML_NATIVE: compile for this CPU's own instruction set, as a user building llama.cpp locally would.
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"],
                   check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True)
    (cache_dir() / "bin").mkdir(exist_ok=True)
    for t in TOOLS:
        shutil.copy2(build_dir / "bin" / t, tool_path(t))
    print(f"built {', '.join(TOOLS)} into {cache_dir() / 'bin'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default %(default)s)")
    p.add_argument("--version", default=None, help="llama-cpp-python version; default: the cached or latest")
    args = p.parse_args(argv)
    build(args.jobs, args.version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
