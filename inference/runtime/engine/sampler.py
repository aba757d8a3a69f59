"""What a request asks of each token it is given, as OpenAI's parameters define it.

Logits processing, in this order, on the target's and the draft's logits alike:
- logit_bias: a fixed amount added to chosen token ids' logits;
- presence and frequency penalties over the tokens generated so far (the prompt does not count):
  logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0).
Then temperature, top-k and top-p (inference.runtime.generate.probabilities); temperature 0 is greedy.

Log-probs are the model's own, log_softmax of the raw logits, before any processing (as vLLM returns them),
which is what loglikelihood evaluation needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.runtime.generate import SamplingConfig, probabilities


@dataclass(kw_only=True, slots=True)
class SamplingParams(SamplingConfig):
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """Return each generated token's log-prob and this many most likely alternatives (0: none)."""
    ignore_eos: bool = False
    """Go on past the end-of-sequence token (benchmarks: exactly max_new_tokens)."""
    prompt_logprobs: bool = False
    """Return each prompt token's log-prob (echo with logprobs); such a request does not reuse cached
    prefix blocks, since it needs the logits of every prompt position."""

    def check(self) -> None:
        SamplingConfig.check(self)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)


def process(logits_KV: torch.Tensor, params: SamplingParams, output: list[int], proposals: list[int]) -> torch.Tensor:
    """Row k of logits_KV is the position after `output` and proposals[:k]: penalties count those tokens."""
    if not params.logit_bias and not params.penalized:
        return logits_KV
    logits_KV = logits_KV.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias))
        logits_KV[:, ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits_KV.dtype)
    if params.penalized:
        K, V = logits_KV.shape
        counts_V = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V).to(logits_KV.dtype)
        for k in range(K):
            if k:
                counts_V[proposals[k - 1]] += 1
            logits_KV[k] -= params.frequency_penalty * counts_V + params.presence_penalty * (counts_V > 0)
    return logits_KV


def choose(
    logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """A token from processed logits, and the distribution it was drawn from (None when greedy)."""
    if params.greedy:
        return int(logits_V.argmax()), None
    probs_V = probabilities(logits_V[None], params)[0]
    return int(torch.multinomial(probs_V, 1, generator=generator)[0]), probs_V


def logprobs_of(logits_KV: torch.Tensor, tokens: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the log-prob of tokens[k], and the `top` most likely tokens with theirs."""
    lp_KV = logits_KV.float().log_softmax(-1)
    chosen = lp_KV[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if not top:
        return [(c, []) for c in chosen]
    values, ids = lp_KV.topk(top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
