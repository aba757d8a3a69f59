"""Quantization quality against llama.cpp: the perplexity that each weight format adds over fp32, on the same
model and the same held-out rows.

    .venv/bin/python bench/quant_quality.py [--rows 32]      (make bench-quant; needs make demo's models and
                                                              make llama-cpp; about 2 minutes)

Model: the demo's trained MoE model (data/moe_model). Rows: its own validation rows (training.data).
- Frugal: fp32, and the INT8 and INT4 (AWQ) targets that quantized_model wrote (data/quantized_model).
- llama.cpp: the model exported as an F32 GGUF (llama.cpp's glm4moe, inference.gguf_export), quantized by
  llama.cpp's own quantizer to Q8_0, Q4_0 and Q4_K_M. Each row is scored with logits for every position.
  llama.cpp falls back to another type for a tensor whose rows its blocks do not split (K-quants need rows of
  256; the demo's d_model is 192), as it does for any model.
Writes bench/results/quant_quality.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose inference.py would shadow the package

from inference.evaluate import perplexity  # noqa: E402
from inference.gguf_export import llama_cpp_quantize, write_gguf  # noqa: E402
from inference.llama_cpp_peer import llama_cpp_perplexity  # noqa: E402
from inference.runtime.quantize import load_quantized, weight_bytes  # noqa: E402
from model.io import load_model  # noqa: E402
from training.data import run_validation_rows  # noqa: E402

LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "quant_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = args.data / "moe_model"
    rows = torch.cat(list(run_validation_rows(run).values()))[: args.rows]
    fp32 = load_model(run).eval()
    results = [{"engine": "Frugal", "format": "fp32", "perplexity": perplexity(fp32, rows)[0],
                "bytes": weight_bytes(fp32)}]  # fmt: skip
    for scheme, label in (("int8", "INT8"), ("int4", "INT4 (AWQ)")):
        model = load_quantized(args.data / "quantized_model" / scheme / "target").eval()
        results.append({"engine": "Frugal", "format": label, "perplexity": perplexity(model, rows)[0],
                        "bytes": weight_bytes(model)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(fp32, run / "tokenizer.json", Path(tmp) / "moe-f32.gguf", name="moe_model")
        files = {"F32": f32} | {
            name: llama_cpp_quantize(f32, Path(tmp) / f"moe-{name}.gguf", ft) for name, ft in LLAMA_FTYPES.items()
        }
        for name, path in files.items():
            results.append({"engine": "llama.cpp", "format": name, "bytes": path.stat().st_size,
                            "perplexity": llama_cpp_perplexity(path, rows, args.threads)})  # fmt: skip
    base = {r["engine"]: r["perplexity"] for r in results if r["format"] in ("fp32", "F32")}
    for r in results:
        r["increase_pct"] = 100 * (r["perplexity"] / base[r["engine"]] - 1)
    print(
        f"\n## Perplexity added by quantization: {run.name}, {rows.shape[0]} held-out rows of {rows.shape[1]} tokens\n"
    )
    print("| engine | format | perplexity | over its own fp32 | weight bytes |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['format']} | {r['perplexity']:.3f} | {r['increase_pct']:+.3f}% | {r['bytes']:,} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows.shape[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
