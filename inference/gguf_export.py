"""A Frugal model as a GGUF file that llama.cpp runs: the llama architecture for dense models, glm4moe for MoE
ones; with the Hugging Face twins of inference.hf_export, the peers of bench/peers.py.

    python -m inference.export --run RUN_DIR --format gguf --outtype f32|f16|q8_0 --out OUT.gguf

Frugal's dense transformer is Llama's: RMSNorm, SwiGLU (w1 = gate, w3 = up, w2 = down), grouped-query
attention and RoPE over adjacent (even, odd) feature pairs, which is llama.cpp's "normal" rope and the layout
of Meta's original checkpoints, so a dense model's tensors go in unpermuted. The MoE model is GLM-4.5's
(see inference.hf_export); llama.cpp's glm4moe uses NEOX rope (the halves of each head), so its query and key
rows are reordered as for transformers, and it reads the router (`ffn_gate_inp`, F32), the selection bias
(`exp_probs_b`), stacked experts (`ffn_{gate,up,down}_exps`), the shared expert (`*_shexp`) and
sigmoid gating with normalised weights from the file's metadata. With tied embeddings the file carries no
output.weight: llama.cpp then projects with token_embd.

The tokenizer (Frugal's byte-level BPE, model.tokenizer) goes in as a "gpt2" vocabulary: its tokens, merges,
and the special tokens as control tokens. llama.cpp's own quantizer makes Q4_0 or Q4_K_M from the F32 file
(bench/peers.py, through llama-cpp-python). Models without an exact equivalent are refused as in
inference.hf_export (softmax routing, top-p routing, no shared expert), and so are quantized ones.
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


def _check_exportable(model: Transformer) -> None:
    from inference.hf_export import exportable

    exportable(model.config)  # llama.cpp's glm4moe runs what Glm4MoeForCausalLM runs: the same refusals
    if getattr(model.layers[0].attn.wq, "weight", None) is None or any(
        m.quantized is not None for m in model.moe_layers()
    ):
        raise ValueError("export the fp32 model: quantized layers have no float weight to write")


def architecture(model: Transformer) -> str:
    return "glm4moe" if model.moe_layers() else "llama"


def tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 weight (rows = outputs, as torch holds them). Dense models use llama's names and
    rope over adjacent pairs (Frugal's own layout); MoE models glm4moe's names, whose NEOX rope rotates the
    halves of each head, so their query and key rows are reordered as for transformers (hf_export._halves)."""
    from inference.hf_export import _halves

    _check_exportable(model)
    cfg = model.config
    moe = bool(model.moe_layers())
    G = cfg.n_kv_heads or cfg.n_heads
    out = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        attn, ffn, b = block.attn, block.ffn, f"blk.{i}."
        q, k = (
            (_halves(attn.wq.weight, cfg.n_heads), _halves(attn.wk.weight, G))
            if moe
            else (attn.wq.weight, attn.wk.weight)
        )
        out |= {b + "attn_norm.weight": block.attn_norm.weight, b + "attn_q.weight": q, b + "attn_k.weight": k,
                b + "attn_v.weight": attn.wv.weight, b + "attn_output.weight": attn.wo.weight,
                b + ("post_attention_norm.weight" if moe else "ffn_norm.weight"): block.ffn_norm.weight}  # fmt: skip
        if isinstance(ffn, SwiGLU):
            out |= {b + "ffn_gate.weight": ffn.w1.weight, b + "ffn_up.weight": ffn.w3.weight,
                    b + "ffn_down.weight": ffn.w2.weight}  # fmt: skip
        else:  # numpy shapes are ggml's reversed: (E, F, D) is ggml's {D, F, E}
            out |= {
                b + "ffn_gate_inp.weight": ffn.router.weight, b + "exp_probs_b.bias": ffn.router.bias,
                b + "ffn_gate_exps.weight": ffn.w1_EFD, b + "ffn_up_exps.weight": ffn.w3_EFD,
                b + "ffn_down_exps.weight": ffn.w2_EDF, b + "ffn_gate_shexp.weight": ffn.shared.w1.weight,
                b + "ffn_up_shexp.weight": ffn.shared.w3.weight, b + "ffn_down_shexp.weight": ffn.shared.w2.weight,
            }  # fmt: skip
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def write_gguf(
    model: Transformer, tokenizer_json: Path, path: Path, name: str = "frugal", outtype: str = "f32"
) -> Path:
    """The model and its tokenizer as a GGUF file at `path` (llama architecture for a dense model, glm4moe for
    an MoE one; matrices in `outtype`)."""
    import gguf

    from model.io import atomic_file

    _check_exportable(model)
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
        _write(gguf.GGUFWriter(str(tmp), architecture(model)), model, name, tokens, types, merges, vocab, outtype)
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
    if model.moe_layers():  # DeepSeek-V3's router: sigmoid scores, the chosen ones normalised, no scaling
        writer.add_expert_count(cfg.n_routed_experts)
        writer.add_expert_used_count(cfg.top_k)
        writer.add_expert_shared_count(cfg.n_shared_experts)
        writer.add_expert_feed_forward_length(cfg.d_expert)
        writer.add_leading_dense_block_count(cfg.n_dense_layers)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_norm(True)
        writer.add_expert_weights_scale(1.0)
        writer.add_nextn_predict_layers(0)
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
        if data.ndim == 1 or outtype == "f32" or tensor_name.endswith("ffn_gate_inp.weight"):  # router: F32
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


def llama_cpp_quantize(f32: Path, out: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (through llama-cpp-python, `make llama-cpp`) on an F32 file: `ftype` is a
    LLAMA_FTYPE, e.g. 7 for Q8_0, 2 for Q4_0, 15 for Q4_K_M. It falls back per tensor where a type's blocks do
    not split the rows, as llama.cpp does for any model."""
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {out}")
    return out


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
