"""llama.cpp for the peer benchmark (bench/peers.py) and the GGUF parity test: the `llama-cpp-python` sdist,
built once per CPU feature set into a cached wheel, then installed into the running venv.

    .venv/bin/python bench/build_llama_cpp.py          # = make llama-cpp: build (about 10 minutes on 2 cores) or reuse

The wheel compiles the sdist's vendored llama.cpp with GGML_NATIVE=OFF and explicit instruction sets read from
/proc/cpuinfo: a native build dies with "Illegal instruction" on VMs that report AMX, and a wheel built with
AVX-512 would crash on an AVX2-only machine, so each feature set gets a wheel of its own, under
$FRUGAL_CACHE (default ~/.cache/frugal)/llama-cpp-python-VERSION/FEATURES/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
# ggml's CMake switch for each /proc/cpuinfo flag set it needs (AMX never: see above)
FEATURES = (
    ("avx", ("avx",), "GGML_AVX"),
    ("avx2", ("avx2",), "GGML_AVX2"),
    ("fma", ("fma",), "GGML_FMA"),
    ("f16c", ("f16c",), "GGML_F16C"),
    ("avx512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    ("avx512_vnni", ("avx512_vnni",), "GGML_AVX512_VNNI"),
    ("avx512_bf16", ("avx512_bf16",), "GGML_AVX512_BF16"),
)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def features(flags: set[str] | None = None) -> list[tuple[str, str]]:
    """(name, CMake switch) of each instruction set this CPU has, in FEATURES order."""
    flags = cpu_flags() if flags is None else flags
    return [(name, switch) for name, needs, switch in FEATURES if all(f in flags for f in needs)]


def cache_dir() -> Path:
    root = Path(os.environ.get("FRUGAL_CACHE", Path.home() / ".cache" / "frugal"))
    tag = "-".join(name for name, _ in features()) or "generic"
    return root / f"llama-cpp-python-{VERSION}" / tag


def cmake_args() -> str:
    on = {switch for _, switch in features()}
    switches = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"]
    switches += [f"-D{switch}={'ON' if switch in on else 'OFF'}" for _, _, switch in FEATURES]
    return " ".join(switches)


def wheel() -> Path:
    """The cached wheel for this CPU, built first when missing."""
    out = cache_dir()
    found = sorted(out.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=cmake_args(), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    print(f"building llama-cpp-python {VERSION} ({env['CMAKE_ARGS']}) into {out}: about 10 minutes on 2 cores")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python"]
    subprocess.run([*pip, "-w", str(out), f"llama-cpp-python=={VERSION}"], env=env, check=True)
    found = sorted(out.glob("llama_cpp_python-*.whl"))
    if not found:
        raise SystemExit(f"{out}: pip built no llama_cpp_python wheel")
    return found[-1]


def installed() -> bool:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python") == VERSION
    except Exception:
        return False


def ensure() -> Path:
    """Build (or reuse) the wheel and install it, with its dependencies, into this interpreter's environment."""
    whl = wheel()
    if not installed():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(whl)], check=True)
    return whl


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(ensure())


if __name__ == "__main__":
    main()
