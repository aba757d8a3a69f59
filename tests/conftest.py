"""Shared fixtures: small corpora written on the fly, and offline W&B in a temp folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# DeepSpeed compiles its CPU communication op on first use (~40 s): once per checkout, not per test.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
# Triton kernels run in Triton's interpreter on CPU tensors (tests/kernels). Triton reads this when a kernel is
# decorated, i.e. when kernels/ is first imported, which inference/ does too: so it is set before any test.
os.environ.setdefault("TRITON_INTERPRET", "1")


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
