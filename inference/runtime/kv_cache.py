"""An INT8 KV cache: keys and values stored as int8 (symmetric, q = round(x / scale) in [-127, 127]) and
dequantized when attention reads them. Two granularities:

- per token (default): one fp32 scale per cached position and head, absmax / 127 over the head
  dimension, computed as the position is written. Memory per position and head: Dh + 4 bytes for each
  of k and v, instead of 4 Dh.
- per channel: one static fp32 scale per head and channel (G, Dh) for each layer's keys and values,
  calibrated once (`calibrate_channel_scales`: absmax over calibration text / 127, values beyond are
  clamped). Key channels differ in size by orders of magnitude (RoPE pairs, outlier channels), which a
  shared per-token scale spends its 8 bits on; memory is Dh bytes per position and head.

Writes and reads go through kernels/kv_int8.py (Triton on a GPU); kernels/attention_int8.py attends over
this layout directly, without dequantizing the cache first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernels import kv_int8
from model.io import read_tensors, save_tensors
from model.transformer import Transformer

KV_SCALES_FILE = "kv_scales.safetensors"
KV_CACHES = ("fp32", "int8", "int8-channel")
"""The KV-cache formats a Generator can use: full precision, INT8 per token, INT8 per channel."""


class Int8LayerCache:
    """One layer's cache. channel_scales: (k_scale_GDh, v_scale_GDh) for per-channel scales, else None.
    Quantizing and dequantizing go through kernels.kv_int8 (Triton on a GPU, torch on the CPU)."""

    def __init__(
        self, shape: tuple[int, int, int, int], channel_scales: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        B, G, S, Dh = shape
        self.k_q, self.v_q = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
        self.per_channel = channel_scales is not None
        if channel_scales is None:
            self.k_scale, self.v_scale = torch.zeros(B, G, S, 1), torch.zeros(B, G, S, 1)
        else:
            k_GDh, v_GDh = channel_scales
            if k_GDh.shape != (G, Dh) or v_GDh.shape != (G, Dh):
                raise ValueError(f"per-channel KV scales must have shape {(G, Dh)}, got {tuple(k_GDh.shape)}")
            self.k_scale, self.v_scale = k_GDh.float(), v_GDh.float()

    def _write(self, q_store: torch.Tensor, scale_store: torch.Tensor, x: torch.Tensor, start: int) -> None:
        end = start + x.shape[2]
        if self.per_channel:
            q_store[:, :, start:end] = kv_int8.quantize_per_channel(x.float(), scale_store)
        else:
            q_store[:, :, start:end], scale_store[:, :, start:end] = kv_int8.quantize_per_token(x.float())

    def _read(self, q_store: torch.Tensor, scale_store: torch.Tensor, end: int, dtype: torch.dtype) -> torch.Tensor:
        scale = scale_store[None, :, None, :] if self.per_channel else scale_store[:, :, :end]
        return kv_int8.dequantize(q_store[:, :, :end], scale, dtype)

    def store(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._write(self.k_q, self.k_scale, k, start)
        self._write(self.v_q, self.v_scale, v, start)
        end = start + k.shape[2]
        return self._read(self.k_q, self.k_scale, end, k.dtype), self._read(self.v_q, self.v_scale, end, v.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_q, self.v_q, self.k_scale, self.v_scale))


@torch.no_grad()
def calibrate_channel_scales(
    model: Transformer, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (k_scale_GDh, v_scale_GDh) = absmax of the keys and values over the calibration token
    batches (each (B, T)) / 127."""
    amax: list[list[torch.Tensor]] = []
    for tokens_BT in batches:
        cache = model.new_cache(tokens_BT.shape[0], tokens_BT.shape[1])
        model(tokens_BT, 0, cache)
        for i, layer in enumerate(cache):
            k, v = layer.k_BGSDh.abs().amax((0, 2)), layer.v_BGSDh.abs().amax((0, 2))
            if len(amax) <= i:
                amax.append([k, v])
            else:
                amax[i] = [torch.maximum(amax[i][0], k), torch.maximum(amax[i][1], v)]
    return [((k / 127).clamp_min(1e-8), (v / 127).clamp_min(1e-8)) for k, v in amax]


def use_int8_kv_cache(
    model: Transformer, channel_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> Transformer:
    """From now on model.new_cache() gives INT8 caches: per token, or per channel with the given scales."""
    if channel_scales is not None and len(channel_scales) != len(model.layers):
        raise ValueError(f"{len(channel_scales)} layers of KV scales for a model of {len(model.layers)} layers")

    def factory(shape, layer: int) -> Int8LayerCache:
        return Int8LayerCache(shape, None if channel_scales is None else channel_scales[layer])

    model.cache_factory = factory
    return model


def save_kv_scales(scales: list[tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    tensors = {f"layers.{i}.{kv}": t.contiguous() for i, pair in enumerate(scales) for kv, t in zip("kv", pair)}
    save_tensors(tensors, path)


def load_kv_scales(path: Path, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tensors = read_tensors(Path(path))  # names a missing or unreadable file
    try:
        return [(tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"]) for i in range(n_layers)]
    except KeyError as e:
        raise ValueError(f"{path}: no scales for {e.args[0]} ({n_layers} layers expected)") from e
