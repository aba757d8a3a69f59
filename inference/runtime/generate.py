"""Text generation from a trained run: prefill, then incremental decoding with the KV cache.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p (nucleus) filtering;
generation stops at max_new_tokens, at eos, or at any of the stop token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.io import load_model
from model.transformer import Transformer

EOS_TOKEN, PAD_TOKEN = "<|eos|>", "<|pad|>"


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = field(default=())
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def probabilities(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a token is sampled from: softmax(logits / T), then top-k and top-p filtering,
    renormalised. Greedy (T = 0) is the one-hot of the argmax."""
    logits_BV = logits_BV.float()
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits_BV.argmax(-1), logits_BV.shape[-1]).float()
    logits_BV = logits_BV / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs_BV = logits_BV.softmax(-1)
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV
        keep_sorted = before_BV < cfg.top_p  # the smallest set whose mass reaches top_p
        keep_BV = torch.zeros_like(keep_sorted).scatter(-1, order_BV, keep_sorted)
        probs_BV = probs_BV * keep_BV
        probs_BV = probs_BV / probs_BV.sum(-1, keepdim=True)
    return probs_BV


def sample(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def next_tokens(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: the argmax when greedy (no distribution built), else a sample."""
    if cfg.temperature == 0:
        return logits_BV.argmax(-1)
    return sample(probabilities(logits_BV, cfg), generator)


class Generator:
    """A model and its tokenizer, ready to generate."""

    def __init__(self, model: Transformer, tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos = tokenizer.token_to_id(EOS_TOKEN) if tokenizer is not None else None

    @classmethod
    def from_run(cls, run_dir: str | Path, kv_cache: str = "fp32") -> Generator:
        """A trained run folder, or a quantized one (with quantization.json, see inference.runtime.quantize);
        kv_cache: fp32, int8 (per-token scales) or int8-channel (the folder's calibrated kv_scales)."""
        from tokenizers import Tokenizer

        from inference.runtime.kv_cache import KV_CACHES, KV_SCALES_FILE, load_kv_scales, use_int8_kv_cache
        from inference.runtime.quantize import QUANT_CONFIG_FILE, load_quantized

        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, not {kv_cache!r}")
        run_dir = Path(run_dir)
        path = run_dir / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{path}: missing")
        tokenizer = Tokenizer.from_file(str(path))
        model = load_quantized(run_dir) if (run_dir / QUANT_CONFIG_FILE).exists() else load_model(run_dir)
        if tokenizer.get_vocab_size() != model.config.vocab_size:
            raise ValueError(
                f"{path}: {tokenizer.get_vocab_size()} tokens, but config.json says "
                f"vocab_size={model.config.vocab_size}"
            )
        if kv_cache == "int8":
            use_int8_kv_cache(model)
        elif kv_cache == "int8-channel":
            scales_path = run_dir / KV_SCALES_FILE
            if not scales_path.exists():
                raise ValueError(f"{scales_path}: missing (per-channel KV scales come from inference.quantized_model)")
            use_int8_kv_cache(model, load_kv_scales(scales_path, model.config.n_layers))
        return cls(model, tokenizer)

    def _stops(self, cfg: SamplingConfig) -> set[int]:
        return set(cfg.stop_ids) | ({self.eos} if self.eos is not None else set())

    def generate_ids(self, prompt: list[int], cfg: SamplingConfig) -> list[int]:
        """New token ids after `prompt` (a stop token ends generation and is not returned)."""
        return self.generate_batch([prompt], cfg)[0]

    def generate_batch(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
        """New token ids after each prompt, decoded together: the prompts are left-padded to one length
        and the padding is masked out of attention, so each row is what it would be alone (greedy
        output is identical; sampled rows draw from one random stream). A row stops at its own stop
        token; decoding stops when every row has stopped or max_new_tokens is reached."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream_batch(prompts, cfg):
            for row, token in zip(out, step):
                if token is not None:
                    row.append(token)
        return out

    def stream(self, prompt: list[int], cfg: SamplingConfig) -> Iterator[int]:
        """The new token ids after `prompt`, each yielded as soon as it is decoded (checked when called)."""
        steps = self.stream_batch([prompt], cfg)
        return (token for (token,) in steps if token is not None)

    def stream_batch(self, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[list[int | None]]:
        """generate_batch, one decoding step at a time: each step yields every row's new token, or None
        for a row that has stopped. The checks run before the first step."""
        cfg.check()
        if not prompts:
            raise ValueError("no prompts")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
        longest, limit = max(map(len, prompts)), self.model.config.max_seq_len
        if longest + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({cfg.max_new_tokens}) exceed the context {limit}")
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        stops = self._stops(cfg)
        B, total = len(prompts), longest + cfg.max_new_tokens
        pad = self.tokenizer.token_to_id(PAD_TOKEN) if self.tokenizer is not None else 0  # masked anyway
        tokens_BT = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts])
        key_mask_BS = None
        if any(len(p) < longest for p in prompts):
            key_mask_BS = torch.ones(B, total, dtype=torch.bool)
            for b, p in enumerate(prompts):
                key_mask_BS[b, : longest - len(p)] = False
        return self._decode(tokens_BT, key_mask_BS, cfg, generator, stops)

    @torch.no_grad()  # on a generator function: grad is off while it runs, not while its caller runs
    def _decode(self, tokens_BT, key_mask_BS, cfg: SamplingConfig, generator, stops) -> Iterator[list[int | None]]:
        B, longest = tokens_BT.shape
        cache = self.model.new_cache(batch=B, max_len=longest + cfg.max_new_tokens)
        logits_BV = self.model(tokens_BT, 0, cache, key_mask_BS)[:, -1]
        running = [True] * B
        for step in range(cfg.max_new_tokens):
            token_B = next_tokens(logits_BV, cfg, generator)
            emitted: list[int | None] = []
            for b, token in enumerate(token_B.tolist()):
                running[b] = running[b] and token not in stops
                emitted.append(token if running[b] else None)
            if not any(running):
                return
            yield emitted
            if step < cfg.max_new_tokens - 1:
                logits_BV = self.model(token_B[:, None], longest + step, cache, key_mask_BS)[:, -1]

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[str]:
        """Completions of a list of prompts, decoded as one batch."""
        if self.tokenizer is None:
            raise ValueError("this Generator has no tokenizer: use generate_ids")
        ids = self.generate_batch([self.tokenizer.encode(p).ids for p in prompts], cfg)
        return [self.tokenizer.decode(x) for x in ids]
