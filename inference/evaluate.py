"""Measuring a model for inference: validation perplexity through the KV cache, the bytes a forward pass
reads (for the bandwidth roofline), the machine's memory bandwidth, and decoding speed.

Perplexity is computed the way generation runs: each row is fed through the KV cache in chunks, so a
quantized cache is part of what is measured (a single full-sequence forward would never read it back).

The roofline: decoding at batch 1 reads every weight it uses once per forward pass, so tokens/s can be
at most bandwidth / bytes read per generated token. `ByteCounter` counts those bytes exactly as the
model runs: each weight-holding module adds its weights' bytes when called (an embedding lookup adds
only the rows it reads, a routed expert only when a token was sent to it), and attention adds the keys
and values it reads from the cache.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, rows_NT: torch.Tensor, chunk: int = 32, batch: int = 16) -> tuple[float, float]:
    """(perplexity, mean nll in nats) of predicting each token of rows_NT from the ones before it,
    decoding through the model's KV cache `chunk` positions at a time."""
    nll, count = 0.0, 0
    for i in range(0, rows_NT.shape[0], batch):
        rows = rows_NT[i : i + batch]
        inputs, targets = rows[:, :-1], rows[:, 1:]
        T = inputs.shape[1]
        cache = model.new_cache(rows.shape[0], T)
        for start in range(0, T, chunk):
            logits = model(inputs[:, start : start + chunk], start, cache).float()
            target = targets[:, start : start + chunk]
            nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += target.numel()
    return math.exp(nll / count), nll / count


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _own_bytes(module: nn.Module) -> int:
    """Parameters and persistent buffers held by the module itself (not RoPE tables, which are indexed)."""
    skip = module._non_persistent_buffers_set
    buffers = [b for name, b in module.named_buffers(recurse=False) if name not in skip]
    return tensor_bytes(*module.parameters(recurse=False), *buffers)


class ByteCounter:
    """Counts the weight and KV-cache bytes a model reads while it runs (see the module docstring).

    with ByteCounter(model) as counter: model(...)  -> counter.bytes
    """

    def __init__(self, *models: nn.Module):
        self.models = models
        self.bytes = 0
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> ByteCounter:
        from model.transformer import Attention, MoE

        for model in self.models:
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    row = module.embedding_dim * module.weight.element_size()
                    self._hook(module, lambda args, row=row: args[0].numel() * row)
                elif isinstance(module, MoE):  # its own parameters are the routed experts' stacks
                    self._count_experts(module)
                elif isinstance(module, Attention):
                    self._hook(module, self._cache_bytes)
                elif own := _own_bytes(module):
                    self._hook(module, lambda args, n=own: n)
        return self

    def _hook(self, module: nn.Module, count: Callable[[tuple], int]) -> None:
        def pre_hook(_module, args):
            self.bytes += count(args)

        self._undo.append(module.register_forward_pre_hook(pre_hook).remove)

    @staticmethod
    def _cache_bytes(args: tuple) -> int:
        """Keys and values of positions 0 .. end - 1, read once per forward (Attention's arguments:
        x, cos, sin, start_pos, cache, ...)."""
        x_BTD, _, _, start_pos, cache = args[:5]
        if cache is None:
            return 0
        end = start_pos + x_BTD.shape[1]
        if hasattr(cache, "k_q"):  # INT8 cache: values, plus per-token scales
            scales = 0 if cache.per_channel else 2 * tensor_bytes(cache.k_scale[:, :, :1])
            return end * (2 * cache.k_q[:, :, :1].numel() + scales)
        return end * 2 * tensor_bytes(cache.k_BGSDh[:, :, :1])

    def _count_experts(self, moe: nn.Module) -> None:
        original = moe._expert

        def expert(e: int, h_ND: torch.Tensor) -> torch.Tensor:
            if moe.quantized is None:  # quantized experts are modules: their own hooks count them
                self.bytes += tensor_bytes(moe.w1_EFD[e], moe.w3_EFD[e], moe.w2_EDF[e])
            return original(e, h_ND)

        moe._expert = expert
        self._undo.append(lambda: delattr(moe, "_expert"))

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory: the best of `repeats` sums over a buffer far larger than
    the caches, with torch's threads."""
    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


@dataclass
class Timed:
    tokens: int
    seconds: float
    bytes_read: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / self.tokens


def timed_generation(
    generate: Callable[[list[int]], list[int]], prompts: list[list[int]], counted: tuple[nn.Module, ...]
) -> Timed:
    """Run generate(prompt) for each prompt at batch 1, with one untimed warm-up call; bytes read are
    counted on a second, untimed pass (the hooks would slow the timed one)."""
    generate(prompts[0])
    start = time.perf_counter()
    outputs = [generate(p) for p in prompts]
    seconds = time.perf_counter() - start
    with ByteCounter(*counted) as counter:
        for p in prompts:
            generate(p)
    return Timed(sum(map(len, outputs)), seconds, counter.bytes, outputs)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every `interval` s by a thread:
    with PeakMemory() as peak: ... -> peak.bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.bytes = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, resident_bytes() - self.start)

    def __enter__(self) -> PeakMemory:
        self.start = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, resident_bytes() - self.start)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
