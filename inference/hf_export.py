"""A trained Frugal model as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads with no
custom code: `Glm4MoeForCausalLM` for MoE models, `LlamaForCausalLM` for dense ones.

Frugal's MoE is GLM-4.5's (DeepSeek-V3's router): grouped-query attention, RMSNorm, SwiGLU, the first
`n_dense_layers` dense, then one shared expert plus fine-grained routed experts per layer, sigmoid scores, a
selection-only bias (`e_score_correction_bias`), the chosen experts' scores normalised to sum to 1. What
differs is mapped exactly:
- RoPE: Frugal rotates adjacent (even, odd) feature pairs, transformers rotates the two halves of each head
  (rotate_half); the rows of every query and key head are reordered (`_halves`), which leaves every attention
  score unchanged. `partial_rotary_factor` is set to 1.0 (Glm4MoeConfig defaults to 0.5).
- Router: `norm_topk_prob=True`, `routed_scaling_factor=1.0`, one expert group (`n_group=topk_group=1`).
- Experts: `gate_up_proj` is Frugal's w1 (gate) and w3 (up) stacked, `down_proj` its w2.
- No QK-norm, no attention bias; tied embeddings and the norm epsilon as trained.
- MTP modules (DeepSeek-V3 section 2.2) as GLM-4.5 checkpoints carry them: `num_nextn_predict_layers` in
  config.json and, for module k, layer `num_hidden_layers + k - 1` with the block's usual weights plus `enorm`,
  `hnorm`, `eh_proj` (its input is [enorm(embedding); hnorm(hidden)]), `shared_head.norm`, and copies of the shared
  embedding and head (`embed_tokens`, `shared_head.head`). transformers ignores those layers; vLLM and SGLang read
  them for MTP speculative decoding.

Refused, naming the field: softmax router scores, top-p dynamic routing (engines run a fixed top-k; with
`approximate` it is exported as top-k and the model card says so), MoE layers without a shared expert, and
quantized models (export the fp32 run).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import ModelConfig
from model.io import CONFIG_FILE, WEIGHTS_FILE, atomic_dir, load_model
from model.tokenizer import TOKENIZER_FILE
from model.transformer import MoE, Transformer

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def _halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from adjacent rope pairs to rotate_half's halves."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def exportable(cfg: ModelConfig, approximate: bool = False) -> list[str]:
    """The approximations an export makes (empty for an exact one); a ValueError naming the field for a
    model that has no equivalent."""
    notes = []
    if cfg.n_routed_experts:
        if cfg.score_func != "sigmoid":
            raise ValueError(f"score_func={cfg.score_func!r}: Glm4MoeForCausalLM's router scores with sigmoid only")
        if cfg.n_shared_experts < 1:
            raise ValueError("n_shared_experts=0: every Glm4MoeForCausalLM MoE layer has a shared expert")
        if cfg.top_p is not None:
            if not approximate:
                raise ValueError(
                    f"top_p={cfg.top_p}: dynamic routing has no equivalent in transformers, vLLM or llama.cpp "
                    "(they route a fixed top-k); pass --approximate to export it as top-k"
                )
            notes.append(f"top_p={cfg.top_p} dynamic routing is exported as fixed top-{cfg.top_k} routing")
    if cfg.mtp_depth and not exports_mtp(cfg):
        notes.append(
            f"the {cfg.mtp_depth} MTP module(s) are left out: "
            + ("LlamaForCausalLM has no MTP layers" if not cfg.n_routed_experts else "their blocks are dense (mtp_moe="
               "false), and GLM-4.5's MTP layers are MoE layers")
        )  # fmt: skip
    return notes


def exports_mtp(cfg: ModelConfig) -> bool:
    """The MTP modules have GLM-4.5's layout (a MoE model whose MTP blocks are MoE) and so are exported."""
    return bool(cfg.mtp_depth and cfg.n_routed_experts and cfg.mtp_moe)


def hf_config(cfg: ModelConfig, token_ids: dict[str, int]):
    from transformers import Glm4MoeConfig, LlamaConfig

    G = cfg.n_kv_heads or cfg.n_heads
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=G, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, bos_token_id=token_ids.get("bos_token"), eos_token_id=token_ids.get("eos_token"),
        pad_token_id=token_ids.get("pad_token"),
    )  # fmt: skip
    if not cfg.n_routed_experts:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        return LlamaConfig(**common, intermediate_size=cfg.d_ff, mlp_bias=False, rope_parameters=rope)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    config = Glm4MoeConfig(
        **common, intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.d_expert, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.top_k, first_k_dense_replace=cfg.n_dense_layers,
        norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1, use_qk_norm=False,
        num_nextn_predict_layers=cfg.mtp_depth if exports_mtp(cfg) else 0, rope_parameters=rope,
        partial_rotary_factor=1.0,
    )  # fmt: skip
    assert config.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0, config.rope_parameters
    return config


def _layer_state(p: str, block, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer's weights under transformers' names, prefixed by `p`."""
    G = cfg.n_kv_heads or cfg.n_heads
    attn, ffn = block.attn, block.ffn
    if getattr(attn.wq, "weight", None) is None:
        raise ValueError("export the fp32 model: quantized layers have no float weight to write")
    state = {
        p + "input_layernorm.weight": block.attn_norm.weight,
        p + "post_attention_layernorm.weight": block.ffn_norm.weight,
        p + "self_attn.q_proj.weight": _halves(attn.wq.weight, cfg.n_heads),
        p + "self_attn.k_proj.weight": _halves(attn.wk.weight, G),
        p + "self_attn.v_proj.weight": attn.wv.weight,
        p + "self_attn.o_proj.weight": attn.wo.weight,
    }
    if isinstance(ffn, MoE):
        if ffn.quantized is not None:
            raise ValueError("export the fp32 model: its experts are quantized")
        shared = ffn.shared
        state |= {
            p + "mlp.gate.weight": ffn.router.weight,
            p + "mlp.gate.e_score_correction_bias": ffn.router.bias,
            p + "mlp.experts.gate_up_proj": torch.cat([ffn.w1_EFD, ffn.w3_EFD], dim=1),
            p + "mlp.experts.down_proj": ffn.w2_EDF,
            p + "mlp.shared_experts.gate_proj.weight": shared.w1.weight,
            p + "mlp.shared_experts.up_proj.weight": shared.w3.weight,
            p + "mlp.shared_experts.down_proj.weight": shared.w2.weight,
        }
    else:
        state |= {p + "mlp.gate_proj.weight": ffn.w1.weight, p + "mlp.up_proj.weight": ffn.w3.weight,
                  p + "mlp.down_proj.weight": ffn.w2.weight}  # fmt: skip
    return state


def state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers' parameter names -> Frugal's fp32 weights, mapped as the module docstring says (the main
    model: what transformers' own model holds)."""
    cfg = model.config
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}  # fmt: skip
    for i, block in enumerate(model.layers):
        state |= _layer_state(f"model.layers.{i}.", block, cfg)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def mtp_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The MTP modules as GLM-4.5 / DeepSeek-V3 checkpoints name them: module k is layer n_layers + k - 1."""
    cfg = model.config
    state = {}
    for k, module in enumerate(model.mtp):
        p = f"model.layers.{cfg.n_layers + k}."
        state |= _layer_state(p, module.block, cfg)
        state |= {
            p + "enorm.weight": module.enorm.weight,
            p + "hnorm.weight": module.hnorm.weight,
            p + "eh_proj.weight": module.eh_proj.weight,
            p + "shared_head.norm.weight": module.norm.weight,
            p + "shared_head.head.weight": model.lm_head.weight,
            p + "embed_tokens.weight": model.embed.weight,
        }
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def _add_mtp_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Put the MTP layers into the saved checkpoint: into model.safetensors, or as one more shard of a sharded
    one (its index updated)."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        shard = "model-mtp.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        doc["weight_map"] |= dict.fromkeys(tensors, shard)
        index.write_text(json.dumps(doc, indent=2) + "\n")
        return
    path = folder / "model.safetensors"
    save_file({**load_file(str(path)), **tensors}, str(path), metadata={"format": "pt"})


def to_hf(model: Transformer, token_ids: dict[str, int] | None = None, approximate: bool = False):
    """A transformers model computing the same function (fp32, eval mode): Llama or Glm4Moe."""
    from transformers import AutoModelForCausalLM

    exportable(model.config, approximate)
    hf = AutoModelForCausalLM.from_config(hf_config(model.config, token_ids or {})).float().eval()
    missing, unexpected = hf.load_state_dict(state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{type(hf).__name__}'s parameters do not match: missing {missing}, unexpected {unexpected}")
    return hf


def _model_card(run_dir: Path, hf, notes: list[str], benchmark: str | None) -> str:
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    train = json.loads((run_dir / "train_config.json").read_text()) if (run_dir / "train_config.json").exists() else {}
    rows = [("architecture", type(hf).__name__), ("parameters", f"{sum(p.numel() for p in hf.parameters()):,}")]
    for key in ("step", "tokens", "val_loss", "active_params", "total_params"):
        if key in summary:
            rows.append((key, f"{summary[key]:.4f}" if isinstance(summary[key], float) else f"{summary[key]:,}"))
    data = train.get("shard_dir") or train.get("data", {}).get("shard_dir")
    lines = [
        f"# {run_dir.name}", "",
        f"A Frugal model exported for Hugging Face `transformers` (`{type(hf).__name__}`, no custom code).", "",
        "| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Lineage", "",
        f"- Trained by Frugal's `training.train` in `{run_dir}`" + (f" on the shards of `{data}`." if data else "."),
        "- The shards come from Frugal's curation graph: clean + exact dedup, MinHash near-dedup, language and "
        "heuristic filters, fastText quality scoring, curriculum order (see the shards' manifest.json).",
        "- Exported by `python -m inference.export`; logits checked against Frugal's own forward "
        "(tests/inference/test_export.py).", "",
    ]  # fmt: skip
    if notes:
        lines += ["## Approximations", "", *(f"- {n}" for n in notes), ""]
    if benchmark:
        lines += ["## Benchmark", "", benchmark, ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", ""]  # fmt: skip
    return "\n".join(lines)


def write_hf(run_dir: Path, out_dir: Path, overwrite: bool = False, approximate: bool = False,
             benchmark: str | None = None) -> Path:  # fmt: skip
    """The run folder's model as a Hugging Face folder at out_dir: config.json, model.safetensors, the
    tokenizer (PreTrainedTokenizerFast), generation_config.json and a README model card. Written to a temp
    folder and renamed, so a crash leaves no half export."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (run_dir / name).exists():
            raise ValueError(f"{run_dir / name}: missing: not a trained run folder")
    model = load_model(run_dir)  # checks the weights against config.json, naming the file
    notes = exportable(model.config, approximate)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(run_dir / TOKENIZER_FILE), **SPECIAL)
    token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL.items() if v in tokenizer.get_vocab()}
    hf = to_hf(model, token_ids, approximate)
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        if exports_mtp(model.config):
            _add_mtp_tensors(tmp, mtp_state_dict(model))
        tokenizer.save_pretrained(tmp)
        generation = GenerationConfig(**{k.replace("_token", "_token_id"): v for k, v in token_ids.items()},
                                      max_length=model.config.max_seq_len)  # fmt: skip
        generation.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(run_dir, hf, notes, benchmark))
        for stray in tmp.glob("*.bin"):  # safetensors only: never pickle
            stray.unlink()
    return out_dir
