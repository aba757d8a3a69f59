"""The engine's forward for steps of few tokens (decoding, speculative rounds, the draft's proposals) as one
static graph, compiled with `torch.compile` (inductor: C++ kernels on a CPU, Triton and CUDA graphs on a GPU).

Why: at Frugal's sizes a decoding step's time goes to dispatching a few hundred small operators from Python,
not to reading weights. A graph whose shapes never change from step to step can be compiled once and replayed.
So everything a step varies is a tensor of fixed shape:

- the N packed tokens are padded to a bucket (BUCKETS by default: 1, 4, 8, 16), so a server compiles a handful of
  graphs, not one per batch size. Padding tokens write their keys and values to a scratch block that no
  sequence owns (the cache's last block), and their logits are dropped;
- each token brings its own position and its own row of block table, padded to the context's full length
  (M = max_seq_len / block_size blocks): attention is computed per token against every slot of its table,
  masked past its position, so no (B, T) layout with data-dependent sizes is needed;
- attention is written as two reductions over the gathered cache (scores = sum over Dh of q * k, then
  out = sum over positions of p * v), which inductor fuses with the block-table gather and the INT8
  dequantization: the cache is read where it lies, never copied into a (N, S, G, Dh) tensor;
- a MoE layer computes every routed expert for every token (inference.runtime.engine.experts, `dense` mode): the
  router's choice becomes gating weights, zero for experts a token did not choose, with no `.tolist()`,
  `nonzero` or loop over chosen experts.

Longer steps (prompt chunks) run the eager packed forward (inference.runtime.engine.runner), which is also the
reference this graph is tested against: same tokens, close logits, for fp32, INT8 and INT4 weights and for
the fp32, INT8 and INT8-per-channel caches.

Shape legend as in inference.runtime.engine.runner; P padded tokens (a bucket), R query heads per kv head.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from inference.runtime.engine.experts import GroupedExperts
from inference.runtime.engine.paged_cache import PagedKVCache
from inference.runtime.engine.runner import Batch
from model.transformer import SwiGLU, Transformer, apply_rope

log = logging.getLogger(__name__)

BUCKETS = (1, 4, 8, 16)
"""Token counts the step is compiled for; a step of N tokens runs in the smallest bucket >= N."""


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    return next((b for b in buckets if b >= n), None)


def _attend(q_PHDh, cache: PagedKVCache, layer: int, slot_PS, allowed_PS, G: int) -> torch.Tensor:
    """Each token's attention over the slots of its block table (masked past its position)."""
    P, H, Dh = q_PHDh.shape
    R = H // G
    flat_k = cache.k[layer].view(-1, G, Dh)
    flat_v = cache.v[layer].view(-1, G, Dh)
    k_PSGDh, v_PSGDh = flat_k[slot_PS].float(), flat_v[slot_PS].float()
    if cache.kind == "int8":
        k_PSGDh = k_PSGDh * cache.k_scale[layer].view(-1, G, 1)[slot_PS]
        v_PSGDh = v_PSGDh * cache.v_scale[layer].view(-1, G, 1)[slot_PS]
    elif cache.kind == "int8-channel":
        k_PSGDh = k_PSGDh * cache.k_scale[layer]
        v_PSGDh = v_PSGDh * cache.v_scale[layer]
    q_PGRDh = q_PHDh.float().view(P, G, R, Dh)
    # (P, S, G, R): scores of each head against each slot
    scores = (q_PGRDh[:, None] * k_PSGDh[:, :, :, None, :]).sum(-1) * (1.0 / math.sqrt(Dh))
    scores = scores.masked_fill(~allowed_PS[:, :, None, None], float("-inf"))
    p_PSGR = scores.softmax(dim=1)
    out_PGRDh = (p_PSGR[..., None] * v_PSGDh[:, :, :, None, :]).sum(1)
    return out_PGRDh.reshape(P, H * Dh).to(q_PHDh.dtype)


def _static_layer(block, x_PD, cache: PagedKVCache, layer: int, slots_P, slot_PS, allowed_PS, cos, sin, experts):
    """One transformer block over P tokens (layer `layer` of `cache`)."""
    attn = block.attn
    P, H, G, Dh = x_PD.shape[0], attn.n_heads, attn.n_kv, attn.head_dim
    h_PD = block.attn_norm(x_PD)
    q_PHDh = apply_rope(attn.wq(h_PD).view(P, H, Dh), cos, sin)
    k_PGDh = apply_rope(attn.wk(h_PD).view(P, G, Dh), cos, sin)
    cache.write(layer, slots_P, k_PGDh, attn.wv(h_PD).view(P, G, Dh))  # in place, traced into the graph
    x_PD = x_PD + attn.wo(_attend(q_PHDh, cache, layer, slot_PS, allowed_PS, G))
    h_PD = block.ffn_norm(x_PD)
    dense = isinstance(block.ffn, SwiGLU)
    return x_PD + (block.ffn(h_PD) if dense else experts[id(block.ffn)].dense(h_PD))


def _slots_and_mask(positions_P, tables_PM, block_size: int):
    """Each token's cache slot for every position of its table (P, S), and which of them it may attend to."""
    S = tables_PM.shape[1] * block_size
    key_S = torch.arange(S, device=positions_P.device)
    slot_PS = tables_PM[:, key_S // block_size] * block_size + key_S % block_size
    return slot_PS, key_S[None, :] <= positions_P[:, None]


def static_forward(
    model: Transformer,
    cache: PagedKVCache,
    experts: dict[int, GroupedExperts],
    block_size: int,
    tokens_P: torch.Tensor,
    positions_P: torch.Tensor,
    slots_P: torch.Tensor,
    tables_PM: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P, V) and final hidden states (P, D, through the final norm) of P tokens, each at its position,
    attending through its own block-table row. Every shape is fixed by P and M, so `torch.compile` traces it into
    one graph."""
    slot_PS, allowed_PS = _slots_and_mask(positions_P, tables_PM, block_size)
    x_PD = model.embed(tokens_P)
    cos = model.rope_cos[positions_P][:, None, :]
    sin = model.rope_sin[positions_P][:, None, :]
    for i, block in enumerate(model.layers):
        x_PD = _static_layer(block, x_PD, cache, i, slots_P, slot_PS, allowed_PS, cos, sin, experts)
    h_PD = model.norm(x_PD)
    return model.lm_head(h_PD).float(), h_PD


def static_mtp_forward(
    model: Transformer,
    depth: int,
    cache: PagedKVCache,
    experts: dict[int, GroupedExperts],
    block_size: int,
    tokens_P: torch.Tensor,
    h_prev_PD: torch.Tensor,
    positions_P: torch.Tensor,
    slots_P: torch.Tensor,
    tables_PM: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` over P tokens, as inference.runtime.engine.runner.mtp_forward: (h^depth (P, D), logits
    (P, V)); its cache layer is depth - 1."""
    slot_PS, allowed_PS = _slots_and_mask(positions_P, tables_PM, block_size)
    module = model.mtp[depth - 1]
    x_PD = module.combine(h_prev_PD, model.embed(tokens_P))
    cos = model.rope_cos[positions_P][:, None, :]
    sin = model.rope_sin[positions_P][:, None, :]
    x_PD = _static_layer(module.block, x_PD, cache, depth - 1, slots_P, slot_PS, allowed_PS, cos, sin, experts)
    return x_PD, model.lm_head(module.norm(x_PD)).float()


def compile_options(device: torch.device, autotune: bool = True) -> dict:
    """Inductor's settings for the step:
    - freezing: the weights are constants of the graph, folded and pre-packed for the GEMM kernels;
    - on a CPU, max_autotune with inductor's C++ GEMM template beside aten's: at one to a few rows, the
      template reads weights at about twice aten's rate (measured on the 2-core machine: BENCHMARKS.md);
      cpp_wrapper: the graph's launcher is C++ too, so a step makes one call from Python, not one per kernel;
    - on CUDA, CUDA graphs: one launch per step.
    autotune=False leaves out max_autotune: a few times faster to compile, slower to run (the tests' choice)."""
    options = {"freezing": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    else:
        options["cpp_wrapper"] = True
        if autotune:
            options.update(
                max_autotune=True,
                max_autotune_gemm_backends="CPP,ATEN",
                autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False,
            )
    return options


class CompiledStep:
    """One model's compiled step, for batches of up to its largest bucket's tokens.

    `compile()` traces and compiles every bucket (at server start-up, logged with its time); calling it
    with a Batch runs the bucket's graph. Without `compile()` (the `--no-compile` switch), `__call__`
    returns None and the engine runs its eager forward."""

    def __init__(self, model: Transformer, cache: PagedKVCache, experts: dict[int, GroupedExperts],
                 block_size: int, buckets: tuple[int, ...] = BUCKETS, autotune: bool = True):  # fmt: skip
        self.model, self.cache, self.block_size, self.buckets = model, cache, block_size, buckets
        self.autotune = autotune
        moe = model.moe_layers()
        self.experts = {id(m): experts.get(id(m)) or GroupedExperts(m) for m in moe}
        self.blocks_per_table = -(-model.config.max_seq_len // block_size)
        self.scratch_block = cache.num_blocks - 1
        """The cache's scratch block (engine.paged_cache), which no sequence owns: padding writes here."""
        self.device = model.embed.weight.device
        self._fn: Callable | None = None
        self.compile_seconds: float | None = None

    @property
    def compiled(self) -> bool:
        return self._fn is not None

    def _forward(self, tokens_P, positions_P, slots_P, tables_PM):
        return static_forward(self.model, self.cache, self.experts, self.block_size,
                              tokens_P, positions_P, slots_P, tables_PM)  # fmt: skip

    def compile(self) -> float:
        """Compile and warm every bucket; returns the seconds it took."""
        start = time.perf_counter()
        # dynamo keeps one graph per bucket and per CompiledStep under the one code object of `_forward`:
        # its default limit of 8 is a target and a draft at 4 buckets each
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        self._fn = torch.compile(self._forward, fullgraph=True, dynamic=False)
        # inductor reads some settings (freezing among them) from its global config, not from compile's
        # options: they hold while the graphs are traced and compiled, here, on each bucket's first call
        with torch._inductor.config.patch(compile_options(self.device, self.autotune)):
            for n in self.buckets:
                self._run(*self._padding(n))  # writes the scratch block only
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled the decode step for %d token buckets in %.1f s", len(self.buckets), self.compile_seconds)
        return self.compile_seconds

    def _padding(self, n: int):
        """Inputs of n padding tokens: position 0, the scratch block."""
        long = dict(dtype=torch.long, device=self.device)
        tables = torch.full((n, self.blocks_per_table), self.scratch_block, **long)
        slots = torch.full((n,), self.scratch_block * self.block_size, **long)
        return torch.zeros(n, **long), torch.zeros(n, **long), slots, tables

    @torch.no_grad()
    def _run(self, *inputs) -> torch.Tensor:
        return self._fn(*inputs)

    def fits(self, batch: Batch) -> bool:
        return self._fn is not None and batch.tokens_N.shape[0] <= self.buckets[-1]

    def _inputs(self, batch: Batch):
        """The batch padded to its bucket: (N, tokens, positions, slots, tables)."""
        N = batch.tokens_N.shape[0]
        P = bucket_for(N, self.buckets)
        tokens, positions, slots, tables = self._padding(P)
        tokens[:N], positions[:N], slots[:N] = batch.tokens_N, batch.positions_N, batch.slots_N
        M = batch.block_tables_BM.shape[1]
        # each token's sequence: the run it belongs to, from the runs' ends
        ends = torch.tensor(batch.ends, device=self.device)
        run_N = torch.searchsorted(ends, torch.arange(N, device=self.device), right=True)
        tables[:N, :M] = batch.block_tables_BM.to(self.device)[run_N]
        return N, tokens, positions, slots, tables

    def __call__(self, batch: Batch, logits_at: list[int], return_hidden: bool = False):
        """Logits (L, V) at `logits_at` (return_hidden: and the hidden states (N, D) of every token, as
        runner.forward), or None when the step does not fit a compiled bucket."""
        if not self.fits(batch):
            return None
        N, tokens, positions, slots, tables = self._inputs(batch)
        logits_PV, h_PD = self._run(tokens, positions, slots, tables)
        logits = logits_PV[torch.tensor(logits_at, dtype=torch.long, device=self.device)]
        return (logits, h_PD[:N]) if return_hidden else logits


class CompiledMTPStep(CompiledStep):
    """The MTP modules' step, compiled per depth and bucket like the target's: `__call__(depth, batch, h_prev_ND,
    logits_at)` gives (h_ND, logits (L, V)), or None when the batch does not fit a bucket (then the engine runs
    runner.mtp_forward)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, experts: dict[int, GroupedExperts],
                 block_size: int, buckets: tuple[int, ...] = BUCKETS, autotune: bool = True):  # fmt: skip
        super().__init__(model, cache, experts, block_size, buckets, autotune)
        # the main layers' stacks the base class looked up are not this step's: it runs the MTP blocks only
        self.experts = {id(m): experts.get(id(m)) or GroupedExperts(m) for m in model.mtp_moe_layers()}
        self._fns: dict[int, Callable] = {}

    @property
    def compiled(self) -> bool:
        return bool(self._fns)

    def fits(self, batch: Batch) -> bool:
        return bool(self._fns) and batch.tokens_N.shape[0] <= self.buckets[-1]

    def compile(self) -> float:
        start = time.perf_counter()
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        D = self.model.config.d_model
        with torch._inductor.config.patch(compile_options(self.device, self.autotune)):
            for depth in range(1, len(self.model.mtp) + 1):

                def step(tokens_P, h_prev_PD, positions_P, slots_P, tables_PM, depth=depth):
                    return static_mtp_forward(self.model, depth, self.cache, self.experts, self.block_size,
                                              tokens_P, h_prev_PD, positions_P, slots_P, tables_PM)  # fmt: skip

                self._fns[depth] = torch.compile(step, fullgraph=True, dynamic=False)
                for n in self.buckets:
                    tokens, positions, slots, tables = self._padding(n)
                    with torch.no_grad():
                        self._fns[depth](tokens, torch.zeros(n, D, device=self.device), positions, slots, tables)
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled the MTP step for %d depths in %.1f s", len(self.model.mtp), self.compile_seconds)
        return self.compile_seconds

    @torch.no_grad()
    def __call__(self, depth: int, batch: Batch, h_prev_ND: torch.Tensor, logits_at: list[int]):
        if not self.fits(batch):
            return None
        N, tokens, positions, slots, tables = self._inputs(batch)
        h_prev = h_prev_ND.new_zeros(tokens.shape[0], h_prev_ND.shape[1])
        h_prev[:N] = h_prev_ND
        h_PD, logits_PV = self._fns[depth](tokens, h_prev, positions, slots, tables)
        return h_PD[:N], logits_PV[torch.tensor(logits_at, dtype=torch.long, device=self.device)]
