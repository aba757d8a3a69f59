"""Self-speculative proposals from the target's own multi-token-prediction modules (DeepSeek-V3 section 2.2),
batched over requests: no second model, and the proposer sees the target's hidden state.

Module k (depth k) at position i reads h^{k-1}_i (the target's final hidden state for k = 1, module k-1's output
otherwise) and token t_{i+k}, and predicts t_{i+k+1}. For a request with C confirmed tokens, the target has
computed positions 0 .. C-2 (its last token is not fed yet), and a round proposes:

    x_0 = depth 1 at position C-2 (reads t_{C-1}),  x_1 = depth 2 at C-2 (reads x_0),  ...,  x_{g-1} = depth g.

Each depth keeps a KV cache (layer k-1 of the engine's MTP cache, with the target's block tables). Its entry at
position i is *confirmed* when it was computed from confirmed inputs, i.e. i + k <= C - 1; the last k - 1
positions a round feeds at depth k read proposals and are overwritten by later rounds. So per request and per
depth we keep `valid[k-1]` (positions < it are confirmed) and, to feed depth k + 1 later, the confirmed hidden
states h^k it has not yet consumed (`trails[k]`). `trails[0]` holds the target's hidden states for positions the
target has computed but depth 1 has not read yet: a prompt's positions, and each round's accepted positions.

A round at depth k feeds positions valid[k-1] .. C-2 (usually k, more after plain steps or at the first round,
which reads the whole prompt). Verification is the engine's, lossless as for a draft model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.runtime.engine import spec_decode
from inference.runtime.engine.runner import Batch, Run


@dataclass(slots=True)
class Trail:
    """Hidden states (n, D) of consecutive positions start .. start + n - 1."""

    start: int
    rows: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.start + (0 if self.rows is None else self.rows.shape[0])

    def append(self, start: int, rows: torch.Tensor) -> None:
        assert start == self.end, f"hidden states for position {start} arrive after those up to {self.end}"
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])

    def take(self, begin: int, end: int) -> torch.Tensor:
        assert self.start <= begin and end <= self.end, (begin, end, self.start, self.end)
        return self.rows[begin - self.start : end - self.start]

    def drop_before(self, position: int) -> None:
        if self.rows is not None and position > self.start:
            self.rows = self.rows[position - self.start :]
            self.start = position


@dataclass(slots=True)
class MTPState:
    """One request's MTP caches and pending hidden states (see the module docstring)."""

    valid: list[int]
    trails: list[Trail] = field(default_factory=list)

    @classmethod
    def start(cls, depth: int, computed: int) -> MTPState:
        """A request whose first `computed` positions are cached for the target and every depth (prefix hits)."""
        return cls([computed] * depth, [Trail(computed) for _ in range(depth)])

    @property
    def ready(self) -> int:
        """Positions every depth's cache holds confirmed (what a shared prefix block may reuse)."""
        return min(self.valid)

    def target_hidden(self, start: int, h_ND: torch.Tensor) -> None:
        """The target computed positions start .. start + n - 1 with these final hidden states."""
        self.trails[0].append(start, h_ND)


def propose(forward, decoding, gammas, block_size: int) -> tuple[list[list[int]], list[list]]:
    """Each decoding request's proposals (up to its gamma <= mtp_depth) and their distributions, one MTP
    forward per depth over every request still proposing. `decoding` are engine Sequences with an MTPState;
    forward(depth, batch, h_prev_ND, logits_at) -> (h_ND, logits) runs one depth (the engine's compiled step, or
    runner.mtp_forward)."""
    proposals: list[list[int]] = [[] for _ in decoding]
    qs: list[list] = [[] for _ in decoding]
    spec: list[tuple[int, torch.Tensor] | None] = [None] * len(decoding)
    """Per request, the previous depth's speculative outputs: (first position, rows up to position C - 2)."""
    for k in range(1, max(gammas, default=0) + 1):
        runs, rows, h_parts, spans = [], [], [], []
        for j, (seq, g) in enumerate(zip(decoding, gammas)):
            if g < k:
                continue
            state: MTPState = seq.mtp
            tokens = seq.tokens
            C, last = len(tokens), len(tokens) - 2  # last: the target's last computed position
            begin = state.valid[k - 1]
            trail = state.trails[k - 1]
            confirmed_end = min(trail.end, last + 1)
            h = trail.take(begin, confirmed_end)
            if confirmed_end <= last:  # depth k-1's speculative outputs of this round
                spec_start, spec_rows = spec[j]
                h = torch.cat([h, spec_rows[confirmed_end - spec_start :]])
            ahead = [tokens[i + k] if i + k < C else proposals[j][i + k - C] for i in range(begin, last + 1)]
            runs.append(Run(ahead, begin, seq.block_table))
            rows.append(j)
            h_parts.append(h)
            spans.append((begin, C))
        batch = Batch.pack(runs, block_size)
        logits_at = [end - 1 for end in batch.ends]
        h_ND, logits_LV = forward(k, batch, torch.cat(h_parts), logits_at)
        starts = [0, *batch.ends[:-1]]
        for r, j in enumerate(rows):
            seq, state = decoding[j], decoding[j].mtp
            begin, C = spans[r]
            out = h_ND[starts[r] : batch.ends[r]]  # positions begin .. C - 2
            token, q = spec_decode.propose(logits_LV[r], seq.params, seq.output_ids, proposals[j], seq.generator)
            proposals[j].append(token)
            qs[j].append(q)
            # positions i + k <= C - 1 read confirmed tokens; a prefix hit may already hold more than that
            confirmed = max(begin, C - k)
            if k < len(state.valid):
                state.trails[k].append(begin, out[: confirmed - begin])
            state.trails[k - 1].drop_before(confirmed)
            state.valid[k - 1] = confirmed
            spec[j] = (confirmed, out[confirmed - begin :])
    return proposals, qs
