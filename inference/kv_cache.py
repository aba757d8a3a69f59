"""An INT8 KV cache: keys and values stored as int8 with one fp32 scale per token and head
(symmetric, absmax / 127 over the head dimension), dequantized when attention reads them.
Memory per cached position: Dh + 4 bytes per head for each of k and v, instead of 4 Dh."""

from __future__ import annotations

import torch

from model.transformer import Transformer


def quantize_per_token(x_BGTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x_BGTDh.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(x_BGTDh / scale).clamp(-127, 127).to(torch.int8), scale.float()


class Int8LayerCache:
    def __init__(self, shape: tuple[int, int, int, int]):
        B, G, S, _ = shape
        self.k_q, self.v_q = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
        self.k_scale, self.v_scale = torch.zeros(B, G, S, 1), torch.zeros(B, G, S, 1)

    def store(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k_q[:, :, start:end], self.k_scale[:, :, start:end] = quantize_per_token(k.float())
        self.v_q[:, :, start:end], self.v_scale[:, :, start:end] = quantize_per_token(v.float())
        k_all = (self.k_q[:, :, :end].float() * self.k_scale[:, :, :end]).to(k.dtype)
        v_all = (self.v_q[:, :, :end].float() * self.v_scale[:, :, :end]).to(v.dtype)
        return k_all, v_all

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_q, self.v_q, self.k_scale, self.v_scale))


def use_int8_kv_cache(model: Transformer) -> Transformer:
    """From now on model.new_cache() gives INT8 caches."""
    model.cache_factory = Int8LayerCache
    return model
