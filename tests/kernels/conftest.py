"""The Triton kernels run here on CPU tensors, in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET
before anything imports kernels/."""

from __future__ import annotations

import pytest


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
