"""One model's KV cache in blocks: per layer, keys and values of shape (num_blocks, block_size, G, Dh),
so that cache slot s = block * block_size + offset is row s of the flat (num_blocks * block_size, G, Dh)
view. Writes scatter the new positions' keys and values to their slots; reads gather a batch's blocks
through its block tables into (B, G, S, Dh) with S = blocks per table * block_size.

Formats (inference.runtime.kv_cache.KV_CACHES):
- fp32: the model's dtype;
- int8: int8 with one fp32 scale per slot and kv head (absmax over Dh / 127), set as the slot is written;
- int8-channel: int8 with static per-layer (G, Dh) scales calibrated offline.
Quantizing and dequantizing go through kernels.kv_int8, as the contiguous INT8 cache does
(inference.runtime.kv_cache), so both layouts hold the same integers for the same keys.
"""

from __future__ import annotations

import torch

from kernels import kv_int8


class PagedKVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        kind: str = "fp32",
        dtype: torch.dtype = torch.float32,
        channel_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        if kind not in ("fp32", "int8", "int8-channel"):
            raise ValueError(f"unknown KV cache {kind!r}")
        if kind == "int8-channel" and (channel_scales is None or len(channel_scales) != n_layers):
            raise ValueError("the int8-channel cache needs per-channel scales for every layer")
        self.kind, self.block_size, self.dtype = kind, block_size, dtype
        self.num_blocks = num_blocks + 1
        """The block pool's blocks, and one more: the scratch block (the last), which no sequence owns and
        where a compiled step's padding tokens write (inference.runtime.engine.compiled)."""
        shape = (self.num_blocks, block_size, n_kv_heads, head_dim)
        store = torch.int8 if kind != "fp32" else dtype
        # empty, not zeros: pages are only touched (made resident) as blocks are first used, and zeroed
        # then (zero_blocks), so a block's unwritten positions read as 0, never as NaN bit patterns
        self.k = [torch.empty(shape, dtype=store) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=store) for _ in range(n_layers)]
        self.k_scale = self.v_scale = None
        if kind == "int8":
            scale_shape = (self.num_blocks, block_size, n_kv_heads, 1)
            self.k_scale = [torch.empty(scale_shape) for _ in range(n_layers)]
            self.v_scale = [torch.empty(scale_shape) for _ in range(n_layers)]
        elif kind == "int8-channel":
            for layer, (k_GDh, v_GDh) in enumerate(channel_scales):
                if k_GDh.shape != (n_kv_heads, head_dim) or v_GDh.shape != (n_kv_heads, head_dim):
                    raise ValueError(f"layer {layer}: per-channel KV scales must have shape {(n_kv_heads, head_dim)}")
            self.k_scale = [k.float() for k, _ in channel_scales]
            self.v_scale = [v.float() for _, v in channel_scales]
        # padding in a batch's block tables points at block 0; the scratch block is read as padding too
        self.zero_blocks([0, self.num_blocks - 1])

    def nbytes(self) -> int:
        tensors = [*self.k, *self.v, *(self.k_scale or []), *(self.v_scale or [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def zero_blocks(self, blocks: list[int]) -> None:
        if not blocks:
            return
        index = torch.tensor(blocks)
        scales = [*self.k_scale, *self.v_scale] if self.kind == "int8" else []
        for t in (*self.k, *self.v, *scales):
            t.index_fill_(0, index, 0)

    def write(self, layer: int, slots_N: torch.Tensor, k_NGDh: torch.Tensor, v_NGDh: torch.Tensor) -> None:
        for store, scales, x in ((self.k, self.k_scale, k_NGDh), (self.v, self.v_scale, v_NGDh)):
            flat = store[layer].view(-1, *store[layer].shape[2:])
            if self.kind == "fp32":
                flat[slots_N] = x.to(flat.dtype)
                continue
            x_1GND = x.float().transpose(0, 1)[None]  # kv_int8 works on (B, G, T, Dh)
            if self.kind == "int8":
                q, scale = kv_int8.quantize_per_token(x_1GND)
                scales[layer].view(-1, *scales[layer].shape[2:])[slots_N] = scale[0].transpose(0, 1)
            else:
                q = kv_int8.quantize_per_channel(x_1GND, scales[layer])
            flat[slots_N] = q[0].transpose(0, 1)

    def read(self, layer: int, block_tables_BM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every position the block tables cover, (B, G, S, Dh) in the model's dtype."""
        out = []
        for store, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x_BGSDh = store[layer][block_tables_BM].flatten(1, 2).transpose(1, 2)
            if self.kind == "int8":
                scale = scales[layer][block_tables_BM].flatten(1, 2).transpose(1, 2)
                x_BGSDh = kv_int8.dequantize(x_BGSDh, scale, self.dtype)
            elif self.kind == "int8-channel":
                x_BGSDh = kv_int8.dequantize(x_BGSDh, scales[layer][None, :, None, :], self.dtype)
            out.append(x_BGSDh)
        return out[0], out[1]
