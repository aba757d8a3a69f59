"""The serving engine: requests in, tokens out, one batched step at a time.

`Engine.add` queues a request (thread-safe); `Engine.step` runs one iteration: admit what fits, build
the batch (decoding requests, then prompt chunks), run the draft's proposals and one target forward,
sample or verify per request, deliver each request's new tokens through its callback, and release the
requests that finished. The server runs the steps in a process of its own (inference.runtime.engine.process);
tests and offline callers step it themselves (`run_until_done`).

Speculative decoding, with a draft model or with the target's own MTP modules (inference.runtime.engine.mtp;
`EngineConfig.proposer`): gamma adapts per step from the measured costs (inference.runtime.speculative
.GammaPolicy, the same for the whole batch), down to plain steps when the draft does not pay. A request
with a seed and temperature > 0 keeps the package's gamma instead, so that its random draws, and therefore
its text, repeat exactly; greedy requests are deterministic under any gamma.

Shape legend as in inference.runtime.engine.runner.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inference.runtime.engine import mtp, runner, spec_decode
from inference.runtime.engine.block_pool import BlockPool
from inference.runtime.engine.compiled import BUCKETS, CompiledMTPStep, CompiledStep
from inference.runtime.engine.experts import GroupedExperts
from inference.runtime.engine.paged_cache import PagedKVCache
from inference.runtime.engine.runner import Batch, Run
from inference.runtime.engine.sampler import SamplingParams, choose, logprobs_of, process
from inference.runtime.engine.scheduler import Scheduler, Sequence, SequenceOutput
from inference.runtime.generate import Generator
from inference.runtime.speculative import GammaPolicy

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit."""


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    max_batch: int = 16
    """Requests decoding together in one step."""
    max_queue: int = 64
    """Requests that may wait for a place in the batch; one more is refused (QueueFull)."""
    max_step_tokens: int = 256
    """New tokens per step, decoding and prompt chunks together: longer prompts are prefilled in chunks."""
    block_size: int = 16
    """Positions per KV block."""
    kv_blocks: int | None = None
    """Blocks in the cache; default: enough for max_batch requests at the full context, twice over (the
    second half keeps released prefixes for reuse). Memory is only touched as blocks are used."""
    prefix_caching: bool = True
    gamma: int = 4
    """The most tokens the draft proposes per round (with MTP, at most the model's mtp_depth)."""
    proposer: str = "auto"
    """Who proposes speculative tokens: "mtp" (the target's multi-token-prediction modules), "draft" (the draft
    model), "none" (plain decoding), or "auto": MTP when the target has modules, else the draft when one is given."""
    adaptive_gamma: bool = True
    compile_sizes: tuple[int, ...] = BUCKETS
    """Token counts of the compiled step's static graphs (`Engine.compile`): a step runs in the smallest that holds
    it, padded."""
    compile_max_tokens: int | None = None
    """Steps of more tokens than the largest of compile_sizes, up to this many, run one compiled graph of dynamic
    size (big batches, verification rounds, prompt chunks); default max_step_tokens; the largest of compile_sizes:
    none (they run eager). Speculative rounds are capped to fit it: max_batch x (gamma + 1) tokens at most."""
    compile_autotune: bool = True
    """Let inductor pick each matmul's kernel by timing them (inference.runtime.engine.compiled.compile_options):
    False compiles a few times faster and decodes slower."""

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_step_tokens", "block_size", "gamma"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.compile_sizes or any(n < 1 for n in self.compile_sizes):
            raise ValueError(f"compile_sizes must be token counts >= 1, got {self.compile_sizes}")
        if self.compile_max_tokens is not None and self.compile_max_tokens < 1:
            raise ValueError(f"compile_max_tokens must be >= 1, got {self.compile_max_tokens}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be >= 1, got {self.kv_blocks}")
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {PROPOSERS}, not {self.proposer!r}")


PROPOSERS = ("auto", "mtp", "draft", "none")


def resolve_proposer(choice: str, target: Generator, draft: Generator | None) -> str:
    """The proposer an engine runs: `choice` checked against what the models have, "auto" resolved."""
    depth = target.model.config.mtp_depth
    if choice == "auto":
        return "mtp" if depth else "draft" if draft is not None else "none"
    if choice == "mtp" and not depth:
        raise ValueError("proposer 'mtp': the target has no MTP modules (its config.json says mtp_depth=0)")
    if choice == "draft" and draft is None:
        raise ValueError("proposer 'draft': no draft model was given")
    return choice


@dataclass(slots=True)
class EngineStats:
    """Counters since start (read by the server's metrics; written on the engine thread)."""

    steps: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    spec_rounds: int = 0
    """Per request: speculative rounds with gamma >= 1."""
    plain_rounds: int = 0
    """Per request: decoding steps without the draft."""
    proposed: int = 0
    accepted: int = 0
    proposed_at: Counter = field(default_factory=Counter)
    """Per proposal index i (0 = the first of a round): rounds in which it was verified, i.e. every earlier
    proposal was accepted (so accepted_at[i] / proposed_at[i] is the acceptance at depth i + 1)."""
    accepted_at: Counter = field(default_factory=Counter)
    last_gamma: int = 0
    finished: Counter = field(default_factory=Counter)
    busy_seconds: float = 0.0
    propose_seconds: float = 0.0
    """Seconds in proposer forwards (the draft's or the MTP modules'), over `propose_forwards` of them, and in
    target forwards, over `verify_forwards`: counted on steps without prompt chunks only, so that their ratio
    is the cost of one proposal step relative to one decoding forward of the target."""
    propose_forwards: int = 0
    verify_seconds: float = 0.0
    verify_forwards: int = 0


@dataclass(slots=True)
class EngineSnapshot:
    running: int
    waiting: int
    kv_blocks: dict[str, int]
    """total, used (held by requests), cached (kept for prefix reuse), free."""
    prefix_queries: int
    prefix_hits: int
    stats: EngineStats


def check_request(prompt_ids: list[int], params: SamplingParams, max_seq_len: int, block_size: int, num_blocks: int):
    """A ValueError for a request that can never run: bad parameters, an empty prompt, or more positions than
    the context or the whole KV cache holds."""
    params.check()
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    n, wanted = len(prompt_ids), params.max_new_tokens
    if n + wanted > max_seq_len:
        raise ValueError(f"prompt ({n}) + max_new_tokens ({wanted}) exceed the context {max_seq_len}")
    if -(-(n + wanted) // block_size) > num_blocks:
        raise ValueError(
            f"prompt ({n}) + max_new_tokens ({wanted}) need more KV blocks than the cache holds ({num_blocks} of "
            f"{block_size} positions)"
        )


def _cache_for(gen: Generator, config: EngineConfig, num_blocks: int) -> PagedKVCache:
    """A paged cache in the format the Generator's contiguous cache uses (see inference.runtime.kv_cache)."""
    from inference.runtime.kv_cache import Int8LayerCache

    model, mc = gen.model, gen.model.config
    G = mc.n_kv_heads or mc.n_heads
    kind, scales = "fp32", None
    factory = getattr(model, "cache_factory", None)
    if factory is not None:
        probe = factory((1, G, 1, mc.head_dim), 0)
        assert isinstance(probe, Int8LayerCache)
        kind = "int8-channel" if probe.per_channel else "int8"
        if probe.per_channel:
            scales = [(c.k_scale, c.v_scale) for c in (factory((1, G, 1, mc.head_dim), i) for i in range(mc.n_layers))]
    dtype = model.embed.weight.dtype
    return PagedKVCache(mc.n_layers, num_blocks, config.block_size, G, mc.head_dim, kind, dtype, scales)


def _grouped_experts(layers) -> dict[int, GroupedExperts]:
    """The usable GroupedExperts of these MoE layers, by id of their layer."""
    stacked = {id(moe): GroupedExperts(moe) for moe in layers}
    return {key: experts for key, experts in stacked.items() if experts.usable}


class Engine:
    def __init__(self, target: Generator, draft: Generator | None = None, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        config.check()
        self.proposer = resolve_proposer(config.proposer, target, draft)
        draft = draft if self.proposer == "draft" else None
        self.target, self.draft = target, draft
        self.max_seq_len = min(g.model.config.max_seq_len for g in (target, draft) if g is not None)
        num_blocks = config.kv_blocks or 2 * config.max_batch * -(-self.max_seq_len // config.block_size)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.pool, config.max_batch, config.max_step_tokens, config.max_queue,
                                   config.prefix_caching, lazy_draft=self.proposer != "mtp")  # fmt: skip
        self.caches = [_cache_for(target, config, num_blocks)]
        if draft is not None:
            self.caches.append(_cache_for(draft, config, num_blocks))
        self.experts = [_grouped_experts(g.model.moe_layers()) for g in (target, draft) if g is not None]
        """Per model, its MoE layers' experts stacked for grouped computation (inference.runtime.engine.experts)."""
        self.gamma = config.gamma
        self.mtp_cache = self.mtp_experts = None
        if self.proposer == "mtp":  # one full-precision cache layer per depth, on the target's block tables
            mc = target.model.config
            self.gamma = min(config.gamma, mc.mtp_depth)
            self.mtp_cache = PagedKVCache(mc.mtp_depth, num_blocks, config.block_size, mc.n_kv_heads or mc.n_heads,
                                          mc.head_dim, "fp32", target.model.embed.weight.dtype)  # fmt: skip
            self.mtp_experts = _grouped_experts(target.model.mtp_moe_layers())
        sizes = tuple(sorted(set(config.compile_sizes)))
        largest = max(sizes[-1], config.compile_max_tokens or config.max_step_tokens)
        if self.proposer != "none":  # a whole round of the full batch fits a compiled graph
            fitting = max(1, min(largest, config.max_step_tokens) // config.max_batch - 1)
            if fitting < self.gamma:
                log.info("gamma %d -> %d: a round of %d requests must fit %d tokens", self.gamma, fitting,
                         config.max_batch, min(largest, config.max_step_tokens))  # fmt: skip
                self.gamma = fitting
        compiled = dict(buckets=sizes, autotune=config.compile_autotune, max_tokens=largest)
        self.steps = [CompiledStep(g.model, cache, experts, config.block_size, **compiled)
                      for g, cache, experts in zip((target, draft), self.caches, self.experts)]  # fmt: skip
        """Per model, its compiled step; idle (the eager forward) until `compile`."""
        if self.proposer == "mtp":
            self.steps.append(CompiledMTPStep(target.model, self.mtp_cache, {**self.experts[0], **self.mtp_experts},
                                              config.block_size, **compiled))  # fmt: skip
        speculative = self.proposer != "none"
        self.policy = GammaPolicy(self.gamma) if speculative and config.adaptive_gamma else None
        self.stats = EngineStats()
        self.eos = target.eos
        self._lock = threading.Lock()
        self._aborts: dict[str, str] = {}
        self._by_id: dict[str, Sequence] = {}
        self._generator = torch.Generator().manual_seed(int(time.time_ns()) % 2**63)

    def compile(self) -> float:
        """Compile every model's step for every token bucket (inference.runtime.engine.compiled), once, before
        serving; returns the seconds it took. Without it every step runs the eager forward."""
        return sum(step.compile() for step in self.steps)

    def _forward(self, which: int, batch: Batch, logits_at: list[int], return_hidden: bool = False):
        """Logits of model `which` (0 target, 1 draft) at `logits_at` (return_hidden: and every token's final
        hidden state): the compiled step when the batch fits one of its buckets, else the eager packed forward."""
        out = self.steps[which](batch, logits_at, return_hidden)
        if out is not None:
            return out
        model = (self.target, self.draft)[which].model
        return runner.forward(model, batch, self.caches[which], logits_at, self.experts[which], return_hidden)

    def _mtp_forward(self, depth: int, batch: Batch, h_prev_ND: torch.Tensor, logits_at: list[int]):
        """MTP module `depth` over a packed batch: the compiled step when it fits a bucket, else eager."""
        out = self.steps[-1](depth, batch, h_prev_ND, logits_at)
        if out is not None:
            return out
        model = self.target.model
        return runner.mtp_forward(model, depth, batch, h_prev_ND, self.mtp_cache, logits_at, self.mtp_experts)

    # -- requests in ---------------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[SequenceOutput], None],
        timeout: float | None = None,
    ) -> None:
        """Queue a request; its outputs arrive through on_output (from step). Raises ValueError
        for a request that can never run, QueueFull when the queue is at its limit."""
        check_request(prompt_ids, params, self.max_seq_len, self.pool.block_size, self.pool.num_blocks)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._generator
        seq = Sequence(request_id, list(prompt_ids), params, on_output, generator=generator)
        if timeout is not None:
            seq.deadline = seq.arrival + timeout
        with self._lock:
            if request_id in self._by_id:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are waiting")
            self.scheduler.waiting.append(seq)
            self._by_id[request_id] = seq

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request at the next step and free its blocks (a client that left, a stop string found)."""
        with self._lock:
            if request_id in self._by_id:
                self._aborts[request_id] = reason

    def snapshot(self) -> EngineSnapshot:
        """What the server reports (/health, /metrics), read under the lock."""
        with self._lock:
            pool = self.pool
            return EngineSnapshot(
                running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                kv_blocks={"total": pool.num_blocks, "used": pool.used(), "cached": len(pool.cached),
                           "free": len(pool.free)},
                prefix_queries=self.scheduler.prefix_queries, prefix_hits=self.scheduler.prefix_hits,
                stats=dataclasses.replace(self.stats, batch_sizes=Counter(self.stats.batch_sizes),
                                          finished=Counter(self.stats.finished),
                                          proposed_at=Counter(self.stats.proposed_at),
                                          accepted_at=Counter(self.stats.accepted_at)),
            )  # fmt: skip

    # -- running to the end ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.running or self.scheduler.waiting or self._aborts)

    def run_until_done(self) -> None:
        """Step until every request has finished (for tests and offline use, without the thread)."""
        while self.has_work():
            self.step()

    # -- one step ------------------------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, tokens=(), logprobs=None) -> None:
        self.scheduler.finish(seq)
        self._by_id.pop(seq.request_id, None)
        self.stats.finished[reason] += 1
        seq.on_output(self._output(seq, list(tokens), logprobs, reason, error))

    def _output(self, seq: Sequence, tokens: list[int], logprobs, reason=None, error=None) -> SequenceOutput:
        out = SequenceOutput(seq.request_id, tokens, logprobs, reason, error, len(seq.prompt_ids), seq.cached_tokens)
        if seq.params.prompt_logprobs and not seq.delivered:
            out.prompt_logprobs, out.prompt_top_logprobs = seq.prompt_logprobs, seq.prompt_top_logprobs
        seq.delivered = True
        return out

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            aborts, self._aborts = self._aborts, {}
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.deadline is not None and now > seq.deadline and seq.request_id not in aborts:
                    aborts[seq.request_id] = "timeout"
            for request_id, reason in aborts.items():
                seq = self._by_id.get(request_id)
                if seq is not None:
                    error = "the request ran past its time limit" if reason == "timeout" else None
                    self._finish(seq, reason, error)

    def step(self) -> None:
        started = time.perf_counter()
        self._expire()
        with self._lock:
            self.scheduler.admit()
            running = list(self.scheduler.running)
        if not running:
            return
        decoding = [s for s in running if not s.prefilling]
        gammas = self._gammas(decoding)
        budget = self.config.max_step_tokens - sum(g + 1 for g in gammas)
        if not decoding:
            budget = self.config.max_step_tokens
        chunks = self.scheduler.prefill_chunks(budget)
        for seq, g in zip(decoding, gammas):
            self.scheduler.grow(seq, len(seq.tokens) + g)
        for seq, n in chunks:
            self.scheduler.grow(seq, seq.computed + n)
        fresh = self.pool.take_fresh()
        for cache in [*self.caches, *([self.mtp_cache] if self.mtp_cache is not None else [])]:
            cache.zero_blocks(fresh)
        if self.proposer == "mtp":
            for seq in running:
                if seq.mtp is None:
                    seq.mtp = mtp.MTPState.start(self.target.model.config.mtp_depth, seq.computed)
        in_step = decoding + [s for s, _ in chunks]
        try:
            t0 = time.perf_counter()
            proposals, qs = self._propose(decoding, gammas)
            t1 = time.perf_counter()
            results, accepted = self._verify(decoding, gammas, proposals, qs, chunks)
            t2 = time.perf_counter()
        except Exception as e:  # a failed step fails its requests, not the engine
            with self._lock:
                for seq in in_step:
                    self._finish(seq, "error", f"decoding failed: {type(e).__name__}: {e}")
            return
        self._observe(decoding, gammas, accepted, t1 - t0, t2 - t1)
        if not chunks:
            if any(gammas):
                self.stats.propose_seconds += t1 - t0
                self.stats.propose_forwards += max(gammas)
            self.stats.verify_seconds += t2 - t1
            self.stats.verify_forwards += 1
        with self._lock:
            for seq, (tokens, logprobs, reason) in results.items():
                self.scheduler.register_full_blocks(seq, self._proposer_computed(seq))
                if reason is not None:
                    self._finish(seq, reason, None, tokens, logprobs)
                elif tokens:
                    seq.on_output(self._output(seq, tokens, logprobs))
        self.stats.steps += 1
        self.stats.batch_sizes[len(in_step)] += 1
        self.stats.busy_seconds += time.perf_counter() - started

    def _proposer_computed(self, seq: Sequence) -> int | None:
        """Positions the proposer's caches hold for `seq` (None without a proposer)."""
        if self.proposer == "draft":
            return seq.draft_computed
        if self.proposer == "mtp":
            return seq.mtp.ready
        return None

    def _gammas(self, decoding: list[Sequence]) -> list[int]:
        if self.proposer == "none" or not decoding:
            return [0] * len(decoding)
        shared = self.policy.choose(self.gamma) if self.policy else self.gamma
        self.stats.last_gamma = shared
        gammas = []
        for seq in decoding:
            fixed = seq.params.seed is not None and not seq.params.greedy  # its draws must repeat
            gammas.append(min(self.gamma if fixed else shared, seq.left - 1))
        return gammas

    def _propose(self, decoding, gammas) -> tuple[list[list[int]], list[list]]:
        """Each decoding request's proposals and their draft distributions. Prompts do not go through the
        draft as they are prefilled (so the first token never waits for it): a request's first draft step
        feeds whatever its draft cache lacks, the prompt included."""
        proposals = [[] for _ in decoding]
        qs = [[] for _ in decoding]
        if not any(gammas):
            return proposals, qs
        if self.proposer == "mtp":
            return mtp.propose(self._mtp_forward, decoding, gammas, self.config.block_size)
        bs = self.config.block_size
        for i in range(max(gammas)):
            runs, rows = [], []
            for j, (seq, g) in enumerate(zip(decoding, gammas)):
                if g <= i:
                    continue
                if i == 0:
                    runs.append(Run(seq.tokens[seq.draft_computed :], seq.draft_computed, seq.block_table))
                else:
                    runs.append(Run([proposals[j][-1]], len(seq.tokens) - 1 + i, seq.block_table))
                rows.append(j)
            batch = Batch.pack(runs, bs)
            logits_at = [batch.ends[k] - 1 for k in range(len(rows))]
            logits_LV = self._forward(1, batch, logits_at)
            for k, j in enumerate(rows):
                seq = decoding[j]
                token, q = spec_decode.propose(logits_LV[k], seq.params, seq.output_ids, proposals[j], seq.generator)
                proposals[j].append(token)
                qs[j].append(q)
        return proposals, qs

    def _verify(self, decoding, gammas, proposals, qs, chunks) -> tuple[dict, list[int]]:
        """One target forward over every decoding round and prompt chunk: per request its new tokens, their
        log-probs and why it finished (None: it goes on); and per decoding request its accepted proposals."""
        runs, wanted = [], []
        for seq, props in zip(decoding, proposals):
            runs.append(Run([seq.tokens[-1], *props], len(seq.tokens) - 1, seq.block_table))
        for seq, n in chunks:
            runs.append(Run(seq.prompt_ids[seq.computed : seq.computed + n], seq.computed, seq.block_table))
        batch = Batch.pack(runs, self.config.block_size)
        begins = [0, *batch.ends[:-1]]
        for k in range(len(runs)):
            if k < len(decoding):
                wanted.append(range(begins[k], batch.ends[k]))
            else:
                seq, n = chunks[k - len(decoding)]
                done = seq.computed + n == len(seq.prompt_ids)
                if seq.params.prompt_logprobs:
                    wanted.append(range(begins[k], batch.ends[k]))
                else:
                    wanted.append(range(batch.ends[k] - 1, batch.ends[k]) if done else range(0))
        flat = [i for r in wanted for i in r]
        if self.proposer == "mtp":  # MTP module 1 reads the target's hidden states of every computed position
            logits_LV, h_ND = self._forward(0, batch, flat, return_hidden=True)
        else:
            logits_LV = self._forward(0, batch, flat)
        rows, at = [], 0
        for r in wanted:
            rows.append(logits_LV[at : at + len(r)])
            at += len(r)
        results, accepted = {}, []
        for k, (seq, g) in enumerate(zip(decoding, gammas)):
            L = len(seq.tokens)
            n, nxt = spec_decode.accept(rows[k], seq.params, seq.output_ids, proposals[k], qs[k], seq.generator)
            seq.computed = L + n
            if self.proposer == "mtp":  # positions L - 1 .. L - 1 + n are now the target's, confirmed
                seq.mtp.target_hidden(L - 1, h_ND[begins[k] : begins[k] + n + 1])
            accepted.append(n)
            if g:
                seq.draft_computed = L + min(n, g - 1)
            results[seq] = self._emit(seq, [*proposals[k][:n], nxt], rows[k])
            self.stats.proposed += g
            self.stats.accepted += n
            for i in range(min(n + 1, g)):
                self.stats.proposed_at[i] += 1
                self.stats.accepted_at[i] += i < n
            if g:
                self.stats.spec_rounds += 1
            else:
                self.stats.plain_rounds += 1
        for k, (seq, n) in enumerate(chunks, start=len(decoding)):
            logits_KV = rows[k]
            start = seq.computed
            seq.computed += n
            if self.proposer == "mtp":
                seq.mtp.target_hidden(start, h_ND[begins[k] : batch.ends[k]])
            self.stats.prompt_tokens += n
            if seq.params.prompt_logprobs:
                nxt_prompt = seq.prompt_ids[start + 1 : seq.computed]
                if start == 0:
                    seq.prompt_logprobs.append(None)
                    seq.prompt_top_logprobs.append([])
                for lp, top in logprobs_of(logits_KV[: len(nxt_prompt)], nxt_prompt, seq.params.logprobs or 0):
                    seq.prompt_logprobs.append(lp)
                    seq.prompt_top_logprobs.append(top)
            if seq.prefilling:
                results[seq] = ([], None, None)
                continue
            last = logits_KV[-1:]
            token, _ = choose(process(last, seq.params, [], [])[0], seq.params, seq.generator)
            results[seq] = self._emit(seq, [token], last)
        return results, accepted

    def _emit(self, seq: Sequence, emitted: list[int], logits_KV: torch.Tensor):
        """Append a round's tokens up to a stop token or max_tokens: (tokens, log-probs, finish reason)."""
        stops = set(seq.params.stop_ids) | ({self.eos} if self.eos is not None and not seq.params.ignore_eos else set())
        tokens, reason = [], None
        for t in emitted:
            if t in stops:
                reason = "stop"
                break
            tokens.append(t)
            if len(seq.output_ids) + len(tokens) == seq.params.max_new_tokens:
                reason = "length"
                break
        seq.output_ids += tokens
        self.stats.generated_tokens += len(tokens)
        logprobs = None
        if seq.params.logprobs is not None and tokens:
            logprobs = logprobs_of(logits_KV[: len(tokens)], tokens, seq.params.logprobs)
        return tokens, logprobs, reason

    def _observe(self, decoding, gammas, accepted, draft_s: float, target_s: float) -> None:
        """Feed the gamma policy: the acceptance over all requests this step, the cost of one draft step
        (a forward over the whole batch) and of the target's forward."""
        if self.policy is None or not decoding:
            return
        self.policy.observe(sum(gammas), sum(accepted), draft_s, target_s, draft_steps=max(gammas))
