"""Text generation from a trained run: prefill, then incremental decoding with the KV cache.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p (nucleus) filtering;
generation stops at max_new_tokens, at eos, or at any of the stop token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.io import load_model
from model.transformer import Transformer

EOS_TOKEN = "<|eos|>"


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


class Generator:
    """A model and its tokenizer, ready to generate."""

    def __init__(self, model: Transformer, tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos = tokenizer.token_to_id(EOS_TOKEN) if tokenizer is not None else None

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Generator:
        from tokenizers import Tokenizer

        run_dir = Path(run_dir)
        path = run_dir / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{path}: missing")
        tokenizer = Tokenizer.from_file(str(path))
        model = load_model(run_dir)
        if tokenizer.get_vocab_size() != model.config.vocab_size:
            raise ValueError(
                f"{path}: {tokenizer.get_vocab_size()} tokens, but config.json says "
                f"vocab_size={model.config.vocab_size}"
            )
        return cls(model, tokenizer)

    def _stops(self, cfg: SamplingConfig) -> set[int]:
        return set(cfg.stop_ids) | ({self.eos} if self.eos is not None else set())

    @torch.no_grad()
    def generate_ids(self, prompt: list[int], cfg: SamplingConfig) -> list[int]:
        """New token ids after `prompt` (a stop token ends generation and is not returned)."""
        cfg.check()
        if not prompt:
            raise ValueError("the prompt is empty")
        limit = self.model.config.max_seq_len
        if len(prompt) + cfg.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_new_tokens ({cfg.max_new_tokens}) exceed the context {limit}"
            )
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        stops = self._stops(cfg)
        cache = self.model.new_cache(batch=1, max_len=len(prompt) + cfg.max_new_tokens)
        logits = self.model(torch.tensor([prompt]), 0, cache)[:, -1]
        out: list[int] = []
        pos = len(prompt)
        for _ in range(cfg.max_new_tokens):
            token = int(sample(probabilities(logits, cfg), generator)[0])
            if token in stops:
                break
            out.append(token)
            logits = self.model(torch.tensor([[token]]), pos, cache)[:, -1]
            pos += 1
        return out

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[str]:
        """Completions of a list of prompts (each decoded with its own KV cache)."""
        if self.tokenizer is None:
            raise ValueError("this Generator has no tokenizer: use generate_ids")
        return [self.tokenizer.decode(self.generate_ids(self.tokenizer.encode(p).ids, cfg)) for p in prompts]
