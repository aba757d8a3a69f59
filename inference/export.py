"""Export a trained run folder for other engines: a Hugging Face folder (transformers, vLLM, SGLang) or a GGUF
file (llama.cpp, Ollama).

    python -m inference.export --run data/moe_model --format hf --out exports/moe_model-hf
    python -m inference.export --run data/dense_baseline_model --format gguf --outtype q8_0 --out exports/dense.gguf

`hf` (inference.hf_export): Glm4MoeForCausalLM for MoE models, LlamaForCausalLM for dense ones, with the
tokenizer, a generation config and a model card. `gguf` (inference.gguf_export): llama.cpp's glm4moe for MoE
models, llama for dense ones, as F32, F16 or Q8_0 (quantized by the gguf package's own Q8_0 code). A model with no exact
equivalent is refused, naming the field (`--approximate` exports top-p routing as top-k and says so). An
existing, non-empty output is refused unless `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.gguf_export import OUTTYPES, write_gguf
from inference.hf_export import write_hf
from model.io import load_model
from model.tokenizer import TOKENIZER_FILE


def export(run_dir: Path, fmt: str, out: Path, outtype: str = "f32", overwrite: bool = False,
           approximate: bool = False, benchmark: str | None = None) -> Path:  # fmt: skip
    run_dir, out = Path(run_dir), Path(out)
    if fmt == "hf":
        return write_hf(run_dir, out, overwrite=overwrite, approximate=approximate, benchmark=benchmark)
    if fmt != "gguf":
        raise ValueError(f"format must be hf or gguf, not {fmt!r}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: exists (pass --overwrite to replace it)")
    return write_gguf(load_model(run_dir), run_dir / TOKENIZER_FILE, out, name=run_dir.name, outtype=outtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="a trained run folder (config.json, weights, tokenizer)"
    )
    parser.add_argument("--format", choices=("hf", "gguf"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the folder (hf) or .gguf file (gguf) to write")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF tensor type")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--approximate", action="store_true", help="export top-p routing as top-k (said in the card)")
    args = parser.parse_args(argv)
    try:
        print(export(args.run, args.format, args.out, args.outtype, args.overwrite, args.approximate))
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
