"""Quantized layers on weights loaded from a file at a deliberately misaligned offset, run in this process
under whatever ATEN_CPU_CAPABILITY it was started with: `python -m tests.inference.runtime.misaligned_load DIR`.

tests/inference/runtime/test_quantize.py starts it once per capability the machine supports, so that a segfault in
a native kernel fails that test instead of killing pytest. It prints one JSON object: the capability torch
chose, how misaligned the raw safetensors views were, and the largest errors against fp32 references.

Widths: debug_tiny's (64, 32, 128, 512), every one a multiple of 16; plus an INT8 layer 40 inputs wide,
which the kernel cannot take as it is (inference.runtime.quantize pads it).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.runtime.quantize import (
    Int8Linear,
    QuantConfig,
    effective_weight,
    load_quantized,
    matrices,
    quantize_int8,
    quantize_weights,
    save_quantized,
)
from model.config import debug_tiny
from model.io import WEIGHTS_FILE
from model.transformer import MoE, Transformer

MISALIGN = 8
"""Bytes past a 16-byte boundary at which every int8 weight lands: where the AVX-512 INT8 kernel crashed."""


def misalign(path: Path, key: str) -> None:
    """Rewrite a safetensors file, padding its header with spaces so that tensor `key` lands MISALIGN bytes
    past a 16-byte boundary once loaded. The loaded address is the page-aligned mmap base plus the file
    offset, so the layout alone decides it (the caller checks)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = raw[8 : 8 + n].rstrip(b" "), raw[8 + n :]
    offset = json.loads(header)[key]["data_offsets"][0]
    pad = (MISALIGN - (8 + len(header) + offset)) % 16
    header += b" " * pad
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def reference_model(model: Transformer, weights: dict) -> Transformer:
    """The fp32 model whose matrices are the quantized ones' effective weights: what the layers should compute."""
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, w in matrices(ref).items():
            w.copy_(effective_weight(weights[name]))
    return ref


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def run(out_dir: Path) -> dict:
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    report: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    for scheme in ("int8", "int4"):
        cfg = QuantConfig(scheme, group_size=32)
        weights = quantize_weights(model, cfg)
        folder = out_dir / scheme
        save_quantized(model, weights, cfg, folder)
        first = next(name for name in weights if ".experts." in name)
        misalign(folder / WEIGHTS_FILE, f"{first}.q")
        raw = load_file(str(folder / WEIGHTS_FILE))
        report[f"{scheme}_raw_q_address_mod_16"] = sorted({raw[f"{n}.q"].data_ptr() % 16 for n in weights})
        quantized = load_quantized(folder)
        ref = reference_model(model, weights)
        with torch.no_grad():
            prefill = quantized(tokens)  # 9 rows through every matrix
            cache = quantized.new_cache(batch=1)
            quantized(tokens[:, :7], 0, cache)
            decode = torch.cat([quantized(tokens[:, i : i + 1], i, cache) for i in (7, 8)], 1)  # 1 row at a time
            expected = ref(tokens)
            moe = next(m for m in quantized.modules() if isinstance(m, MoE))
            empty = [layer(torch.empty(0, layer.in_features)) for expert in moe.quantized for layer in expert]
            # one token, top-2 of 4 routed experts: at least two experts receive no tokens in this forward
            one_token = quantized(tokens[:, :1])
        report[f"{scheme}_prefill_error"] = relative_error(prefill, expected)
        report[f"{scheme}_decode_error"] = relative_error(decode, expected[:, 7:])
        report[f"{scheme}_one_token_error"] = relative_error(one_token, expected[:, :1])
        report[f"{scheme}_empty_expert_shapes"] = sorted({tuple(e.shape) for e in empty})
    narrow = quantize_int8(torch.randn(48, 40))
    x = torch.randn(6, 40)
    report["int8_width40_error"] = relative_error(Int8Linear(narrow)(x), x @ narrow.dequantize().T)
    return report


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
