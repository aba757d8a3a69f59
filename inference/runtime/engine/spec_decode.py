"""Batched speculative decoding: the draft proposes for every decoding request at once, one target forward
verifies all of them, and each request accepts its own prefix (the rule of inference.runtime.speculative, per row).

Round for a request with L tokens (the last one not yet in the target's cache) and gamma g:
- draft step 0 feeds the tokens the draft's cache lacks, up to and including the last (usually one; more
  after plain steps, which skip the draft), and proposes x_0 from its logits; steps 1 .. g-1 each feed the
  previous proposal. Every draft step is one forward over all requests still proposing.
- the target feeds [last, x_0 .. x_{g-1}] at positions L-1 .. L-1+g and returns g + 1 distributions.
- greedy: accept while x_i is the target's argmax, then emit the target's own token; sampled: accept x_i
  with probability min(1, p(x_i) / q(x_i)), resample the first rejection from norm(max(0, p - q)), or
  sample one more from p_{g+1} when all are accepted. Lossless either way.
- afterwards the target's cache holds positions < L + n (n accepted); the draft's < L + min(n, g - 1),
  since it never fed its last proposal. Entries past those are overwritten by later rounds.
"""

from __future__ import annotations

import torch

from inference.runtime.engine.sampler import SamplingParams, choose, process
from inference.runtime.generate import probabilities
from inference.runtime.speculative import verify


def propose(
    logits_V: torch.Tensor, params: SamplingParams, output: list[int], proposals: list[int], generator
) -> tuple[int, torch.Tensor | None]:
    """The draft's next proposal and its distribution q (None when greedy: q is one-hot)."""
    return choose(process(logits_V[None], params, output, proposals)[0], params, generator)


def accept(
    logits_KV: torch.Tensor,
    params: SamplingParams,
    output: list[int],
    proposals: list[int],
    qs: list[torch.Tensor | None],
    generator,
) -> tuple[int, int]:
    """(accepted proposals n, the token emitted after them) from the target's g + 1 logits rows."""
    processed = process(logits_KV, params, output, proposals)
    g = len(proposals)
    if params.greedy:
        best = processed.argmax(-1).tolist()
        n = next((i for i, (x, y) in enumerate(zip(proposals, best)) if x != y), g)
        return n, best[n]
    if g == 0:
        return 0, choose(processed[0], params, generator)[0]
    p_KV = probabilities(processed, params)
    accepted, next_B = verify(p_KV[None], torch.stack(qs)[None], torch.tensor([proposals]), generator)
    return int(accepted[0]), int(next_B[0])
