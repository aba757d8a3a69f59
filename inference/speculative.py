"""Lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

Each round, the draft model proposes gamma tokens one by one (sampling from its distribution q); the
target model scores the last accepted token and all gamma proposals in one forward pass, giving its
distributions p_1 .. p_{gamma+1}. Proposal i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at
the first rejection, the token is resampled from normalise(max(0, p_i - q_i)) and the round ends; when
all are accepted, one more token is sampled from p_{gamma+1}. Every emitted token is then distributed
exactly as the target's own sampling would give it. Greedy (temperature 0: p and q one-hot) reduces to
"accept while the draft's token is the target's argmax", so the output is plain greedy decoding's.

Both KV caches simply continue from the accepted position: entries past it are overwritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from inference.generate import Generator, SamplingConfig, probabilities


def verify(
    p_BKV: torch.Tensor, q_BKV: torch.Tensor, draft_BK: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification, batched over B independent rounds.

    p_BKV: target distributions for the K = gamma proposals plus one (B, gamma + 1, V);
    q_BKV: draft distributions (B, gamma, V); draft_BK: the proposals (B, gamma).
    Returns (accepted_B, next_B): how many proposals were accepted, and the token emitted after them.
    """
    B, K = draft_BK.shape
    p_x = p_BKV[:, :K].gather(-1, draft_BK[..., None]).squeeze(-1)
    q_x = q_BKV.gather(-1, draft_BK[..., None]).squeeze(-1)
    u = torch.rand(B, K, generator=generator)
    ok_BK = u * q_x < p_x  # u < p/q, without dividing by a zero q
    accepted_B = ok_BK.long().cumprod(-1).sum(-1)
    rows = torch.arange(B)
    p_next = p_BKV[rows, accepted_B]  # p at the first rejected position, or p_{gamma+1}
    residual = torch.where(
        (accepted_B < K)[:, None], (p_next - q_BKV[rows, accepted_B.clamp(max=K - 1)]).clamp_min(0), p_next
    )
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)  # p == q: resample from p
    next_B = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return accepted_B, next_B


@dataclass(slots=True)
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward pass (accepted proposals + the target's own token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


class SpeculativeGenerator:
    """A target Generator with a draft model that shares its tokenizer."""

    def __init__(self, target: Generator, draft: Generator, gamma: int = 4):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if target.model.config.vocab_size != draft.model.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.model.config.vocab_size}) differs from the target's "
                f"({target.model.config.vocab_size})"
            )
        tokenizers = (target.tokenizer, draft.tokenizer)
        if None not in tokenizers and tokenizers[0].to_str() != tokenizers[1].to_str():
            raise ValueError("the draft's tokenizer differs from the target's: they must be the same tokenizer.json")
        self.target, self.draft, self.gamma = target, draft, gamma
        self.stats = SpeculativeStats()

    def generate_ids(self, prompt: list[int], cfg: SamplingConfig) -> list[int]:
        return list(self.stream(prompt, cfg))

    def stream(self, prompt: list[int], cfg: SamplingConfig) -> Iterator[int]:
        """The new token ids after `prompt`, yielded as each round accepts them (a burst per round).
        The checks run before the first token."""
        cfg.check()
        if not prompt:
            raise ValueError("the prompt is empty")
        limit = min(self.target.model.config.max_seq_len, self.draft.model.config.max_seq_len)
        total = len(prompt) + cfg.max_new_tokens
        if total + self.gamma > limit:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_new_tokens ({cfg.max_new_tokens}) + gamma ({self.gamma}) exceed {limit}"
            )
        return self._decode(prompt, cfg)

    @torch.no_grad()  # on a generator function: grad is off while it runs, not while its caller runs
    def _decode(self, prompt: list[int], cfg: SamplingConfig) -> Iterator[int]:
        total = len(prompt) + cfg.max_new_tokens
        generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        stops = self.target._stops(cfg)
        t_cache = self.target.model.new_cache(1, total + self.gamma)
        d_cache = self.draft.model.new_cache(1, total + self.gamma)
        # prefill both with all but the last prompt token; each round starts by feeding `last`
        if len(prompt) > 1:
            self.target.model(torch.tensor([prompt[:-1]]), 0, t_cache)
            self.draft.model(torch.tensor([prompt[:-1]]), 0, d_cache)
        pos, last, produced = len(prompt) - 1, prompt[-1], 0
        greedy = cfg.temperature == 0
        while produced < cfg.max_new_tokens:
            gamma = min(self.gamma, cfg.max_new_tokens - produced)
            proposals, qs, token = [], [], last
            for i in range(gamma):
                logits_V = self.draft.model(torch.tensor([[token]]), pos + i, d_cache)[0, -1]
                if greedy:  # q is one-hot: no distribution to keep
                    token = int(logits_V.argmax())
                else:
                    qs.append(probabilities(logits_V[None], cfg)[0])
                    token = int(torch.multinomial(qs[-1], 1, generator=generator)[0])
                proposals.append(token)
            logits_KV = self.target.model(torch.tensor([[last, *proposals]]), pos, t_cache)[0]
            if greedy:  # accept while the draft's token is the target's argmax; then the target's own
                best = logits_KV.argmax(-1).tolist()
                n = next((i for i, (x, y) in enumerate(zip(proposals, best)) if x != y), gamma)
                nxt = best[n]
            else:
                p = probabilities(logits_KV, cfg)
                accepted, next_B = verify(p[None], torch.stack(qs)[None], torch.tensor([proposals]), generator)
                n, nxt = int(accepted[0]), int(next_B[0])
            self.stats.rounds += 1
            self.stats.proposed += gamma
            self.stats.accepted += n
            emitted = [*proposals[:n], nxt]
            if n == gamma:  # the draft has not seen its last proposal yet: keep its cache in step
                self.draft.model(torch.tensor([[proposals[-1]]]), pos + gamma, d_cache)
            for t in emitted:
                if t in stops or produced == cfg.max_new_tokens:
                    return
                produced += 1
                yield t
            pos += len(emitted)
            last = emitted[-1]

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[str]:
        tok = self.target.tokenizer
        if tok is None:
            raise ValueError("the target Generator has no tokenizer: use generate_ids")
        return [tok.decode(self.generate_ids(tok.encode(p).ids, cfg)) for p in prompts]
