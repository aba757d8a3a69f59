"""A dense Frugal model as a GGUF file that llama.cpp runs (llama architecture), and as a Hugging Face
`LlamaForCausalLM` holding the same weights: the peers of bench/peers.py.

    python -m inference.gguf_export RUN_DIR OUT.gguf

Frugal's dense transformer is Llama's: RMSNorm, SwiGLU (w1 = gate, w3 = up, w2 = down), grouped-query
attention and RoPE over adjacent (even, odd) feature pairs, which is llama.cpp's "normal" rope and the layout
of Meta's original checkpoints. So the GGUF tensors are Frugal's own, unpermuted. Hugging Face's Llama rotates
the two halves of each head instead (rotate_half), so `to_hf_llama` reorders the rows of every query and key
head from (0, 1, 2, 3, ...) to (0, 2, 4, ..., 1, 3, 5, ...), which leaves every attention score unchanged.
With tied embeddings the file carries no output.weight: llama.cpp then projects with token_embd.

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


def write_gguf(model: Transformer, tokenizer_json: Path, path: Path, name: str = "frugal") -> Path:
    """The model and its tokenizer as an F32 llama-architecture GGUF file at `path`."""
    import gguf

    from model.io import atomic_file

    _check_dense(model)
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
        _write(gguf.GGUFWriter(str(tmp), "llama"), model, name, tokens, types, merges, vocab)
    return path


def _write(writer, model: Transformer, name: str, tokens, types, merges, vocab) -> None:
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
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
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
        writer.add_tensor(tensor_name, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from adjacent rope pairs to rotate_half's halves."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_llama(model: Transformer):
    """A transformers LlamaForCausalLM computing the same function (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_dense(model)
    cfg = model.config
    G = cfg.n_kv_heads or cfg.n_heads
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=G,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    hf = LlamaForCausalLM(hf_config).eval()
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    state["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "self_attn.q_proj.weight": _halves(block.attn.wq.weight, cfg.n_heads),
            p + "self_attn.k_proj.weight": _halves(block.attn.wk.weight, G),
            p + "self_attn.v_proj.weight": block.attn.wv.weight,
            p + "self_attn.o_proj.weight": block.attn.wo.weight,
            p + "mlp.gate_proj.weight": block.ffn.w1.weight, p + "mlp.up_proj.weight": block.ffn.w3.weight,
            p + "mlp.down_proj.weight": block.ffn.w2.weight,
        }  # fmt: skip
    missing, unexpected = hf.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=False)
    if unexpected or any(not k.endswith("rotary_emb.inv_freq") for k in missing):
        raise ValueError(f"LlamaForCausalLM's weights do not match: missing {missing}, unexpected {unexpected}")
    return hf


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
