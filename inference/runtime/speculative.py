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

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from inference.runtime.generate import Generator, SamplingConfig, probabilities


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


class GammaPolicy:
    """Adaptive gamma: before each round, the gamma in 0 .. gamma_max with the most expected tokens per
    second, E(a, g) / (g t_draft + t_target), where E(a, g) = (1 - a^(g+1)) / (1 - a) is the expected
    tokens a round emits when each proposal is accepted with probability a (Leviathan et al. 2023), a the
    acceptance rate so far (an exponential average over rounds) and t_* the measured seconds per draft
    and target pass. gamma 0 is a plain decoding step: where the draft is rarely right or costs too much,
    speculation turns itself off, and every `probe_every` plain steps one gamma-1 round measures again."""

    def __init__(self, gamma_max: int, decay: float = 0.7, probe_every: int = 8):
        self.gamma_max, self.decay, self.probe_every = gamma_max, decay, probe_every
        self.alpha = 0.6
        self.t_draft: float | None = None
        self.t_target: float | None = None
        self.plain_steps = 0

    def choose(self, left: int) -> int:
        if self.t_draft is None or self.t_target is None:
            return min(self.gamma_max, left)  # measure first
        if self.plain_steps >= self.probe_every:
            self.plain_steps = 0
            return 1

        def rate(g: int) -> float:
            emitted = sum(self.alpha**i for i in range(g + 1))
            return emitted / (g * self.t_draft + self.t_target)

        best = max(range(min(self.gamma_max, left) + 1), key=rate)
        self.plain_steps = self.plain_steps + 1 if best == 0 else 0
        return best

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def observe(
        self, proposed: int, accepted: int, draft_s: float, target_s: float, draft_steps: int | None = None
    ) -> None:
        """One round: `draft_steps` draft forwards (default: one per proposal; a batched round proposes for
        every request in each forward) that took draft_s, then a target forward of target_s."""
        steps = proposed if draft_steps is None else draft_steps
        if proposed and steps:
            self.alpha = self._average(self.alpha, accepted / proposed)
            self.t_draft = self._average(self.t_draft, draft_s / steps)
        self.t_target = self._average(self.t_target, target_s)


class SpeculativeGenerator:
    """A target Generator with a draft model that shares its tokenizer. adaptive: choose gamma (up to
    `gamma`, down to plain decoding) each round by `GammaPolicy`; any gamma keeps the output exact."""

    def __init__(self, target: Generator, draft: Generator, gamma: int = 4, adaptive: bool = False):
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
        self.target, self.draft, self.gamma, self.adaptive = target, draft, gamma, adaptive
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
        history, d_pos = list(prompt), len(prompt) - 1  # d_pos: positions the draft's cache holds
        greedy = cfg.temperature == 0
        policy = GammaPolicy(self.gamma) if self.adaptive else None
        while produced < cfg.max_new_tokens:
            left = cfg.max_new_tokens - produced
            gamma = policy.choose(left) if policy else min(self.gamma, left)
            started = time.perf_counter()
            if gamma and d_pos < pos:  # plain steps ran without the draft: catch its cache up
                self.draft.model(torch.tensor([history[d_pos:pos]]), d_pos, d_cache)
            proposals, qs, token = [], [], last
            for i in range(gamma):
                logits_V = self.draft.model(torch.tensor([[token]]), pos + i, d_cache)[0, -1]
                if greedy:  # q is one-hot: no distribution to keep
                    token = int(logits_V.argmax())
                else:
                    qs.append(probabilities(logits_V[None], cfg)[0])
                    token = int(torch.multinomial(qs[-1], 1, generator=generator)[0])
                proposals.append(token)
            drafted = time.perf_counter()
            logits_KV = self.target.model(torch.tensor([[last, *proposals]]), pos, t_cache)[0]
            if greedy:  # accept while the draft's token is the target's argmax; then the target's own
                best = logits_KV.argmax(-1).tolist()
                n = next((i for i, (x, y) in enumerate(zip(proposals, best)) if x != y), gamma)
                nxt = best[n]
            elif gamma == 0:
                n, nxt = 0, int(torch.multinomial(probabilities(logits_KV, cfg)[0], 1, generator=generator)[0])
            else:
                p = probabilities(logits_KV, cfg)
                accepted, next_B = verify(p[None], torch.stack(qs)[None], torch.tensor([proposals]), generator)
                n, nxt = int(accepted[0]), int(next_B[0])
            if policy:
                policy.observe(gamma, n, drafted - started, time.perf_counter() - drafted)
            self.stats.rounds += 1
            self.stats.proposed += gamma
            self.stats.accepted += n
            emitted = [*proposals[:n], nxt]
            if gamma and n == gamma:  # the draft has not seen its last proposal yet: keep its cache in step
                self.draft.model(torch.tensor([[proposals[-1]]]), pos + gamma, d_cache)
            if gamma:
                d_pos = pos + len(emitted)
            for t in emitted:
                if t in stops or produced == cfg.max_new_tokens:
                    return
                produced += 1
                yield t
            history += emitted
            pos += len(emitted)
            last = emitted[-1]

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[str]:
        tok = self.target.tokenizer
        if tok is None:
            raise ValueError("the target Generator has no tokenizer: use generate_ids")
        return [tok.decode(self.generate_ids(tok.encode(p).ids, cfg)) for p in prompts]
