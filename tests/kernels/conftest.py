"""The Triton kernels run here on CPU tensors, in Triton's interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated, i.e. when kernels/ is first imported: this conftest is imported before the test modules
of this folder, so the variable is set first."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_kernels():
    """Skips a test of the Triton kernels where triton (the `gpu` extra) is not installed."""
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[gpu]'")


@pytest.fixture
def cpu_dispatch(monkeypatch):
    """The dispatchers' choice for CPU tensors, whatever the environment says."""
    monkeypatch.delenv("FRUGAL_FORCE_TRITON", raising=False)


@pytest.fixture
def forced_triton(monkeypatch, triton_kernels):
    monkeypatch.setenv("FRUGAL_FORCE_TRITON", "1")
