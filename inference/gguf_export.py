"""A dense Frugal model as a GGUF file that llama.cpp runs (llama architecture); with its Hugging Face twin
(inference.hf_export), the peers of bench/peers.py.

    python -m inference.gguf_export RUN_DIR OUT.gguf

Frugal's dense transformer is Llama's: RMSNorm, SwiGLU (w1 = gate, w3 = up, w2 = down), grouped-query
attention and RoPE over adjacent (even, odd) feature pairs, which is llama.cpp's "normal" rope and the layout
of Meta's original checkpoints. So the GGUF tensors are Frugal's own, unpermuted (Hugging Face's Llama rotates
the two halves of each head instead, which inference.hf_export maps). With tied embeddings the file carries
no output.weight: llama.cpp then projects with token_embd.

The tokenizer (Frugal's byte-level BPE, model.tokenizer) goes in as a "gpt2" vocabulary: its tokens, merges,
and the special tokens as control tokens. The file is F32; llama.cpp's own quantizer makes Q8_0 or Q4_0 from it
(bench/peers.py, through llama-cpp-python). MoE models are refused: llama.cpp's MoE architectures name
other router and bias conventions than this exporter writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from model.transformer import SwiGLU, Transformer

SPECIAL = ("<|bos|>", "<|eos|>", "<|pad|>")
OUTTYPES = ("f32", "f16", "q8_0")
"""Tensor types of the file: matrices in F32, F16 or Q8_0 (the gguf package's quantizer, llama.cpp's
format; a matrix whose rows do not split into blocks of 32 falls back to F16); norms always F32, as
llama.cpp's converter writes them."""


def _check_dense(model: Transformer) -> None:
    if model.moe_layers():
        raise ValueError("only dense models export to GGUF (llama architecture); this one has MoE layers")
    if getattr(model.layers[0].attn.wq, "weight", None) is None:
        raise ValueError("export the fp32 model: quantized layers have no float weight to write")


def tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 weight (rows = outputs, as torch holds them)."""
    _check_dense(model)
    out = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight}
    if not model.config.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        attn, ffn = block.attn, block.ffn
        assert isinstance(ffn, SwiGLU)
        out |= {
            f"blk.{i}.attn_norm.weight": block.attn_norm.weight, f"blk.{i}.ffn_norm.weight": block.ffn_norm.weight,
            f"blk.{i}.attn_q.weight": attn.wq.weight, f"blk.{i}.attn_k.weight": attn.wk.weight,
            f"blk.{i}.attn_v.weight": attn.wv.weight, f"blk.{i}.attn_output.weight": attn.wo.weight,
            f"blk.{i}.ffn_gate.weight": ffn.w1.weight, f"blk.{i}.ffn_up.weight": ffn.w3.weight,
            f"blk.{i}.ffn_down.weight": ffn.w2.weight,
        }  # fmt: skip
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def write_gguf(
    model: Transformer, tokenizer_json: Path, path: Path, name: str = "frugal", outtype: str = "f32"
) -> Path:
    """The model and its tokenizer as a llama-architecture GGUF file at `path` (matrices in `outtype`)."""
    import gguf

    from model.io import atomic_file

    _check_dense(model)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    cfg = model.config
    spec = json.loads(Path(tokenizer_json).read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for token in spec.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    if len(vocab) != cfg.vocab_size or sorted(vocab.values()) != list(range(cfg.vocab_size)):
        raise ValueError(f"{tokenizer_json}: {len(vocab)} tokens with ids 0..{cfg.vocab_size - 1} expected")
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens]

    with atomic_file(Path(path)) as tmp:  # never a partial file at `path`
        _write(gguf.GGUFWriter(str(tmp), "llama"), model, name, tokens, types, merges, vocab, outtype)
    return path


def _write(writer, model: Transformer, name: str, tokens, types, merges, vocab, outtype: str) -> None:
    import gguf

    cfg = model.config
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads or cfg.n_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for special, add in (("<|bos|>", writer.add_bos_token_id), ("<|eos|>", writer.add_eos_token_id),
                         ("<|pad|>", writer.add_pad_token_id)):  # fmt: skip
        if special in vocab:
            add(vocab[special])
    writer.add_add_bos_token(False)
    for tensor_name, t in tensors(model).items():
        data = t.numpy().astype(np.float32)
        if data.ndim == 1 or outtype == "f32":
            writer.add_tensor(tensor_name, data)
        elif outtype == "f16" or data.shape[-1] % 32:  # rows that Q8_0's blocks of 32 do not split: F16, as
            writer.add_tensor(tensor_name, data.astype(np.float16))  # llama.cpp's converter falls back
        else:  # Q8_0: blocks of 32 along each row, one f16 scale per block
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    from model.io import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a trained dense run folder (config.json, weights, tokenizer.json)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.run_dir)
        print(write_gguf(model, args.run_dir / "tokenizer.json", args.out, name=args.run_dir.name))
    except ValueError as e:
        parser.error(f"{args.run_dir}: {e}")


if __name__ == "__main__":
    main()
