"""Shared fixtures: small corpora written on the fly, and offline W&B in a temp folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed compiles its CPU communication op on first use (~40 s): once per checkout, not per test.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
# Triton kernels run in Triton's interpreter on CPU tensors (tests/kernels). Triton reads this when a kernel is
# decorated, i.e. when kernels/ is first imported, which inference/ does too: so it is set before any test.
os.environ.setdefault("TRITON_INTERPRET", "1")


CPU_CAPABILITIES = ("default", "avx2", "avx512")
"""ATEN_CPU_CAPABILITY values on x86, each a superset of the one before."""


def cpu_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this machine can run: every level up to the one torch picks by itself."""
    import torch

    best = torch.backends.cpu.get_cpu_capability().lower()
    return list(CPU_CAPABILITIES[: CPU_CAPABILITIES.index(best) + 1]) if best in CPU_CAPABILITIES else ["default"]


def run_under_capability(
    capability: str, args: list[str], timeout: float = 300, expect_signal: bool = False
) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess with ATEN_CPU_CAPABILITY set, from the repository root: a crash in a native
    kernel fails the calling test with the signal's name, instead of killing pytest (unless expect_signal)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0 and not expect_signal:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"{' '.join(args)} died of {name} under ATEN_CPU_CAPABILITY={capability}:\n{proc.stderr}")
    return proc


def run_with_tmpfs(mount_point: Path, size: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """bash SCRIPT in a private mount namespace (util-linux `unshare`, as root or through a user namespace) in which
    a tmpfs of SIZE is mounted at mount_point: a small disk that fills up, or (`mount -o remount,ro`) a read-only
    folder even for root. The mount exists for that process only and ends with it. Runs from the repository root,
    with $PY set to this interpreter."""
    mount_point.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs '{mount_point}'\n{script}"
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(
        ["unshare", "-rm", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (JSON-encoded), str (written as they are) or bytes (raw line)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            f.write((row.encode() if isinstance(row, str) else row) + b"\n")
    return path


def prose(seed: int, n_words: int = 120) -> str:
    """Deterministic text with a large vocabulary, so distinct seeds share almost no 5-grams."""
    import random

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "dun", "sel", "par", "ith", "om", "bre", "zu"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n_words))


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
