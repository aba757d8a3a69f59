"""The iteration-level scheduler (Orca; vLLM's v1 scheduler): before every step it decides which requests
run and how many new tokens each brings.

- Running requests that are decoding come first: one token each, or a speculative round.
- Then prompts, in arrival order, in chunks: a step's tokens are capped by `max_step_tokens`, so a long
  prompt is prefilled over several steps while the others keep decoding (chunked prefill).
- Waiting requests join as soon as there is room: fewer than `max_batch` running, and the KV blocks they
  may need reserved (inference.runtime.engine.block_pool). The queue is first come, first served: a request that
  does not fit waits, and so do the ones behind it. Running requests are never preempted.
- A request leaves the batch the step it finishes (a stop token, max_tokens, an abort, its time limit).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inference.runtime.engine.block_pool import BlockPool, block_hashes
from inference.runtime.engine.sampler import SamplingParams


@dataclass(slots=True)
class SequenceOutput:
    """What one step produced for one request, delivered through its `on_output`."""

    request_id: str
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    """"stop" (a stop or end token), "length" (max_tokens), "abort", "timeout" or "error"."""
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    prompt_logprobs: list[float | None] | None = None
    """With the first output of an echo request: per prompt token its log-prob (None for the first)."""
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[SequenceOutput], None]
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    reserved: int = 0
    """Blocks reserved for this sequence and not yet in its table."""
    computed: int = 0
    """Positions whose keys and values the target's cache holds."""
    draft_computed: int = 0
    """The same, for the draft's cache (it may lag behind after plain steps)."""
    cached_tokens: int = 0
    hashes: list[bytes] = field(default_factory=list)
    """Prefix hashes of the full blocks known so far; the first `registered` are registered."""
    registered: int = 0
    generator: torch.Generator | None = None
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    delivered: bool = False
    """Whether an output went out yet (the first carries the prompt's log-probs)."""
    mtp: object | None = None
    """The MTP proposer's caches and pending hidden states (inference.runtime.engine.mtp.MTPState)."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def left(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_batch: int,
        max_step_tokens: int,
        max_queue: int,
        prefix_caching: bool,
        lazy_draft: bool = True,
    ):
        """lazy_draft: the proposer catches up by itself on cached blocks its cache lacks (a draft model);
        False (MTP, which needs the target's hidden states) reuses only blocks the proposer holds too."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.pool, self.max_batch, self.max_step_tokens = pool, max_batch, max_step_tokens
        self.max_queue, self.prefix_caching, self.lazy_draft = max_queue, prefix_caching, lazy_draft
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_queries = self.prefix_hits = 0
        """Prompt tokens looked up in the prefix cache, and found."""

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.pool.block_size)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the batch while they fit; the ones admitted."""
        admitted = []
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not seq.hashes:
                seq.hashes = block_hashes(seq.prompt_ids, bs)
            hits = []
            if self.prefix_caching and not seq.params.prompt_logprobs:
                usable = (len(seq.prompt_ids) - 1) // bs  # the last prompt token is always computed: its logits
                hits = self.pool.lookup(seq.hashes[:usable])
            ready = next((i for i, b in enumerate(hits) if b not in self.pool.draft_ready), len(hits))
            if not self.lazy_draft:
                # an MTP entry at depth k reads the token k positions ahead, so a block's last entries depend on
                # the next block's tokens: reuse a ready block only when the next block matched too
                hits = hits[: ready if ready < len(hits) else max(0, ready - 1)]
                ready = len(hits)
            need = self.blocks_for(len(seq.prompt_ids) + seq.params.max_new_tokens) - len(hits)
            if not self.pool.can_admit(hits, need):
                break
            self.waiting.popleft()
            self.pool.admit(hits, need)
            seq.block_table, seq.reserved = list(hits), need
            seq.computed = seq.cached_tokens = len(hits) * bs
            seq.draft_computed = ready * bs  # the draft catches up on the rest at its first proposal
            seq.registered = len(hits)
            if not seq.params.prompt_logprobs:
                self.prefix_queries += len(seq.prompt_ids)
                self.prefix_hits += seq.cached_tokens
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def grow(self, seq: Sequence, positions: int) -> None:
        """Hand the sequence blocks until its table covers `positions` positions (from its reservation)."""
        while len(seq.block_table) * self.pool.block_size < positions:
            seq.block_table.append(self.pool.allocate())
            seq.reserved -= 1

    def register_full_blocks(self, seq: Sequence, draft_computed: int | None = None) -> None:
        """Name every block whose positions the target's cache holds by its prefix hash, and mark those the
        draft's cache holds too (draft_computed: its positions; None without a draft)."""
        bs = self.pool.block_size
        full = min(seq.computed, len(seq.tokens)) // bs
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes += block_hashes(seq.tokens[i * bs : (i + 1) * bs], bs, parent)
        for i in range(seq.registered, full):
            self.pool.register(seq.block_table[i], seq.hashes[i])
        seq.registered = max(seq.registered, full)
        if draft_computed is not None:
            self.pool.draft_ready.update(seq.block_table[: min(full, draft_computed // bs)])

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.block_table, seq.reserved)
            seq.block_table, seq.reserved = [], 0
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def prefill_chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """(sequence, prompt tokens to compute this step) for prefilling sequences, oldest first."""
        chunks = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                n = min(len(seq.prompt_ids) - seq.computed, budget)
                chunks.append((seq, n))
                budget -= n
        return chunks
