"""The engine's forward as static graphs, compiled with `torch.compile` (inductor: C++ kernels on a CPU, Triton and
CUDA graphs on a GPU), for every step the engine runs: decoding batches, speculative rounds (verification of
B x (gamma + 1) tokens, the draft's or the MTP modules' proposals) and prompt chunks.

Why: at Frugal's sizes a decoding step's time goes to dispatching a few hundred small operators from Python,
not to reading weights. A graph whose shapes never change from step to step can be compiled once and replayed.
So everything a step varies is a tensor, of shapes a few graphs cover:

- the N packed tokens are padded to a bucket (BUCKETS by default: 1, 4, 8, 16), so a server compiles a handful of
  static graphs, not one per batch size. Padding tokens write their keys and values to a scratch block that no
  sequence owns (the cache's last block), and their logits are dropped. Steps of more tokens than the largest
  bucket (big batches, verification rounds, prompt chunks), up to `max_tokens`, run one more graph whose token
  count is symbolic (a dynamic dimension: inductor's loops take it as an argument), with no padding; it computes
  the head only at the rows whose logits are wanted;
- each token brings its own position and its own row of block table, as wide as the step's longest table (M
  blocks, at least 2), not the context's full length: M is a dynamic dimension of every graph, so attention
  reads the blocks the batch uses, whatever the context is, without a graph per context length. Attention is
  computed per token against every slot of its table, masked past its position, so no (B, T) layout with
  data-dependent sizes is needed;
- attention is written as two reductions over the gathered cache (scores = sum over Dh of q * k, then
  out = sum over positions of p * v), which inductor fuses with the block-table gather and the INT8
  dequantization: the cache is read where it lies, never copied into a (N, S, G, Dh) tensor;
- a MoE layer reads only the chosen experts' weights while a step's assignments are fewer than its experts, and
  computes every expert for every token beyond (inference.runtime.engine.experts): the router's choice becomes
  gathers and gating weights, with no `.tolist()`, `nonzero` or loop over chosen experts.

The eager packed forward (inference.runtime.engine.runner) is the reference this graph is tested against (same
tokens, close logits, for fp32, INT8 and INT4 weights and for the fp32, INT8 and INT8-per-channel caches), and
what runs before `compile()` or with `--no-compile`.

Compiling happens at start-up only, logged with its time. Inductor's FX graph cache keeps compiled graphs across
restarts of the same model and settings (in TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>), but
only graphs whose weights are plain tensors: mkldnn-prepacked weights are opaque to it. So the fast-compile graphs
(no autotuning: tests, the demo's waterfall, `--fast-compile`) turn prepacking off, which costs them nothing
measurable, and a restart compiles them in about half the time (dynamo still traces). The autotuned graphs keep
it: without prepacking inductor's C++ GEMM template does not apply and a 91M model decodes 2x slower
(BENCHMARKS.md), so they are compiled anew at each start.

Shape legend as in inference.runtime.engine.runner; P padded tokens (a bucket), R query heads per kv head,
L rows whose logits are wanted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inference.runtime.engine.experts import GroupedExperts
from inference.runtime.engine.paged_cache import PagedKVCache
from inference.runtime.engine.runner import Batch
from inference.runtime.quantize import stack_rows
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


def _static_layer(block, x_PD, cache: PagedKVCache, layer: int, slots_P, slot_PS, allowed_PS, cos, sin, experts,
                  long: bool = False):  # fmt: skip
    """One transformer block over P tokens (layer `layer` of `cache`); long: P is symbolic (the graph past the
    buckets)."""
    attn = block.attn
    P, H, G, Dh = x_PD.shape[0], attn.n_heads, attn.n_kv, attn.head_dim
    h_PD = block.attn_norm(x_PD)
    if (qkv := experts.get(id(attn))) is not None:  # one quantized call for q, k and v (fused_projections)
        q_PD, k_PD, v_PD = qkv(h_PD).split([H * Dh, G * Dh, G * Dh], -1)
    else:
        q_PD, k_PD, v_PD = attn.wq(h_PD), attn.wk(h_PD), attn.wv(h_PD)
    q_PHDh = apply_rope(q_PD.view(P, H, Dh), cos, sin)
    k_PGDh = apply_rope(k_PD.reshape(P, G, Dh), cos, sin)
    cache.write(layer, slots_P, k_PGDh, v_PD.reshape(P, G, Dh))  # in place, traced into the graph
    x_PD = x_PD + attn.wo(_attend(q_PHDh, cache, layer, slot_PS, allowed_PS, G))
    h_PD = block.ffn_norm(x_PD)
    if not isinstance(block.ffn, SwiGLU):
        return x_PD + experts[id(block.ffn)].for_step(h_PD, long)
    if (w13 := experts.get(id(block.ffn))) is not None:  # w1 and w3 in one call
        a_PF, b_PF = w13(h_PD).chunk(2, -1)
        return x_PD + block.ffn.w2(F.silu(a_PF) * b_PF)
    return x_PD + block.ffn(h_PD)


def fused_projections(blocks) -> dict[int, torch.nn.Module]:
    """For blocks whose projections are quantized: q/k/v stacked into one layer (by id of the attention) and a
    dense feed-forward's w1/w3 into another (by id of the feed-forward), so that each quantizes and reads its
    input once per step (inference.runtime.quantize.stack_rows; each output is computed as in its own layer).
    Float layers stay apart: oneDNN's GEMMs are not row-for-row those of a stacked matrix."""
    fused: dict[int, torch.nn.Module] = {}
    for block in blocks:
        attn = block.attn
        if (qkv := stack_rows([attn.wq, attn.wk, attn.wv])) is not None:
            fused[id(attn)] = qkv
        if isinstance(block.ffn, SwiGLU) and (w13 := stack_rows([block.ffn.w1, block.ffn.w3])) is not None:
            fused[id(block.ffn)] = w13
    return fused


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
    rows_L: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P, V), or (L, V) at rows_L, and final hidden states (P, D, through the final norm) of P tokens, each
    at its position, attending through its own block-table row. Shapes are fixed by P, M and L, so
    `torch.compile` traces it into one graph."""
    slot_PS, allowed_PS = _slots_and_mask(positions_P, tables_PM, block_size)
    x_PD = model.embed(tokens_P)
    cos = model.rope_cos[positions_P][:, None, :]
    sin = model.rope_sin[positions_P][:, None, :]
    for i, block in enumerate(model.layers):
        x_PD = _static_layer(block, x_PD, cache, i, slots_P, slot_PS, allowed_PS, cos, sin, experts, rows_L is not None)
    h_PD = model.norm(x_PD)
    return model.lm_head(h_PD if rows_L is None else h_PD[rows_L]).float(), h_PD


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
    rows_L: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` over P tokens, as inference.runtime.engine.runner.mtp_forward: (h^depth (P, D), logits
    (P, V), or (L, V) at rows_L); its cache layer is depth - 1."""
    slot_PS, allowed_PS = _slots_and_mask(positions_P, tables_PM, block_size)
    module = model.mtp[depth - 1]
    x_PD = module.combine(h_prev_PD, model.embed(tokens_P))
    cos = model.rope_cos[positions_P][:, None, :]
    sin = model.rope_sin[positions_P][:, None, :]
    x_PD = _static_layer(module.block, x_PD, cache, depth - 1, slots_P, slot_PS, allowed_PS, cos, sin, experts,
                         rows_L is not None)  # fmt: skip
    return x_PD, model.lm_head(module.norm(x_PD if rows_L is None else x_PD[rows_L])).float()


def compile_options(device: torch.device, autotune: bool = True) -> dict:
    """Inductor's settings for the step:
    - freezing: the weights are constants of the graph, folded and, when autotuning, prepacked for the GEMM kernels;
    - on a CPU, vectors as wide as ATEN_CPU_CAPABILITY allows; max_autotune with inductor's C++ GEMM template
      beside aten's: at one to a few rows, the template reads weights at about twice aten's rate (measured on the
      2-core machine: BENCHMARKS.md);
      cpp_wrapper: the graph's launcher is C++ too, so a step makes one call from Python, not one per kernel;
    - on CUDA, CUDA graphs: one launch per step.
    autotune=False leaves out max_autotune: a few times faster to compile, slower to run (the tests' choice)."""
    options = {"freezing": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    else:
        options["cpp_wrapper"] = True
        # the vector width of the kernels torch itself runs (ATEN_CPU_CAPABILITY), written into the options so that
        # it is part of the cache's key: a graph cached under AVX-512 is never reused, as source, under AVX2 or
        # without vectors (measured: its C++ then fails to compile)
        capability = torch.backends.cpu.get_cpu_capability()
        if capability == "DEFAULT":
            options["cpp.vec_isa_ok"] = False
        elif capability in ("AVX2", "AVX512"):
            options["cpp.simdlen"] = 256 if capability == "AVX2" else 512
        if not autotune:  # mkldnn-packed weights keep a graph out of inductor's cache (see the module docstring)
            options["cpp.weight_prepack"] = False
        else:
            options.update(
                max_autotune=True,
                max_autotune_gemm_backends="CPP,ATEN",
                autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False,
            )
    return options


MIN_BLOCKS = 2
"""Block tables are at least this wide in a graph: dynamo specializes a dimension of size 0 or 1."""


def _mark(tensor: torch.Tensor, dim: int, low: int, high: int) -> torch.Tensor:
    """Mark a dimension dynamic in [low, high] for the trace (torch._dynamo.mark_dynamic; no bound when equal)."""
    torch._dynamo.mark_dynamic(tensor, dim, min=low, max=max(high, low + 1))
    return tensor


class CompiledStep:
    """One model's compiled step, for steps of up to `max_tokens` tokens (the largest bucket without it).

    `compile()` traces and compiles every graph (at server start-up, logged with its time); calling it
    with a Batch runs the graph that fits. Without `compile()` (the `--no-compile` switch), `__call__`
    returns None and the engine runs its eager forward."""

    def __init__(self, model: Transformer, cache: PagedKVCache, experts: dict[int, GroupedExperts],
                 block_size: int, buckets: tuple[int, ...] = BUCKETS, autotune: bool = True,
                 max_tokens: int | None = None):  # fmt: skip
        self.model, self.cache, self.block_size, self.buckets = model, cache, block_size, buckets
        self.autotune = autotune
        self.max_tokens = max(max_tokens or 0, buckets[-1])
        """Steps of buckets[-1] < N <= max_tokens tokens run the graph of dynamic size (none when equal)."""
        moe = model.moe_layers()
        self.experts = {id(m): experts.get(id(m)) or GroupedExperts(m) for m in moe}
        """The engine's modules per layer: each MoE's GroupedExperts, and fused quantized projections."""
        self.experts |= fused_projections(model.layers)
        self.blocks_per_table = max(MIN_BLOCKS, -(-model.config.max_seq_len // block_size))
        self.scratch_block = cache.num_blocks - 1
        """The cache's scratch block (engine.paged_cache), which no sequence owns: padding writes here."""
        self.device = model.embed.weight.device
        self._fn: Callable | None = None
        self.compile_seconds: float | None = None

    @property
    def compiled(self) -> bool:
        return self._fn is not None

    @property
    def sizes(self) -> str:
        """The token counts the graphs cover, for the log."""
        rest = f" and {self.buckets[-1] + 1}-{self.max_tokens}" if self.max_tokens > self.buckets[-1] else ""
        return ", ".join(map(str, self.buckets)) + rest

    def _forward(self, tokens_P, positions_P, slots_P, tables_PM, rows_L=None):
        return static_forward(self.model, self.cache, self.experts, self.block_size,
                              tokens_P, positions_P, slots_P, tables_PM, rows_L)  # fmt: skip

    def _trace(self, fn: Callable, extra: Callable[[int], tuple] = lambda n: ()) -> Callable:
        """`fn` compiled for every bucket and for the dynamic size: each traced once here, on padding inputs
        (writing the scratch block only), with the table width dynamic. `extra(n)`: further inputs of n tokens
        that go before the positions (the MTP step's hidden states)."""
        dynamo = torch._dynamo.config
        # dynamo keeps one graph per size and per step under the one code object of `fn`: its default limit of
        # 8 is a target and a draft at 4 buckets each
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        compiled = torch.compile(fn, fullgraph=True, dynamic=None)
        M = self.blocks_per_table
        with (
            torch._inductor.config.patch(compile_options(self.device, self.autotune)),
            torch._dynamo.config.patch(automatic_dynamic_shapes=False),  # only what is marked is dynamic
            torch.no_grad(),
        ):
            for n in self.buckets:
                tokens, positions, slots, tables = self._padding(n, M)
                compiled(tokens, *extra(n), positions, slots, _mark(tables, 1, MIN_BLOCKS, M))
            if self.max_tokens > self.buckets[-1]:
                low, high = self.buckets[-1] + 1, self.max_tokens
                tokens, positions, slots, tables = self._padding(low, M)
                more = extra(low)
                for t in (tokens, positions, slots, tables, *more):
                    _mark(t, 0, low, high)
                rows = _mark(torch.zeros(2, dtype=torch.long, device=self.device), 0, 2, high)
                compiled(tokens, *more, positions, slots, _mark(tables, 1, MIN_BLOCKS, M), rows)
        return compiled

    def compile(self) -> float:
        """Compile and warm every graph; returns the seconds it took."""
        start = time.perf_counter()
        self._fn = self._trace(self._forward)
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled the step for %s tokens in %.1f s", self.sizes, self.compile_seconds)
        return self.compile_seconds

    def _padding(self, n: int, m: int):
        """Inputs of n padding tokens with tables of m blocks: position 0, the scratch block."""
        long = dict(dtype=torch.long, device=self.device)
        tables = torch.full((n, m), self.scratch_block, **long)
        slots = torch.full((n,), self.scratch_block * self.block_size, **long)
        return torch.zeros(n, **long), torch.zeros(n, **long), slots, tables

    @torch.no_grad()
    def _run(self, *inputs) -> torch.Tensor:
        return self._fn(*inputs)

    def fits(self, batch: Batch) -> bool:
        return self._fn is not None and batch.tokens_N.shape[0] <= self.max_tokens

    def _inputs(self, batch: Batch):
        """The batch padded to its bucket (or as it is, past the largest), its tables to at least MIN_BLOCKS:
        (N, tokens, positions, slots, tables)."""
        N = batch.tokens_N.shape[0]
        P = bucket_for(N, self.buckets) or N
        M = max(MIN_BLOCKS, batch.block_tables_BM.shape[1])
        tokens, positions, slots, tables = self._padding(P, M)
        tokens[:N], positions[:N], slots[:N] = batch.tokens_N, batch.positions_N, batch.slots_N
        # each token's sequence: the run it belongs to, from the runs' ends
        ends = torch.tensor(batch.ends, device=self.device)
        run_N = torch.searchsorted(ends, torch.arange(N, device=self.device), right=True)
        tables[:N, : batch.block_tables_BM.shape[1]] = batch.block_tables_BM.to(self.device)[run_N]
        return N, tokens, positions, slots, tables

    def _rows(self, P: int, logits_at: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the graph's rows_L input, where the wanted logits are in its output): in a bucket, every row's
        logits come out; past the largest, only the wanted ones (at least 2 rows: the graph's smallest L)."""
        at = torch.tensor(logits_at, dtype=torch.long, device=self.device)
        if self.buckets[-1] >= P:
            return None, at
        rows = at if len(logits_at) >= 2 else torch.cat([at, at.new_zeros(2 - len(logits_at))])
        return rows, torch.arange(len(logits_at), device=self.device)

    def __call__(self, batch: Batch, logits_at: list[int], return_hidden: bool = False):
        """Logits (L, V) at `logits_at` (return_hidden: and the hidden states (N, D) of every token, as
        runner.forward), or None when the step does not fit a compiled graph."""
        if not self.fits(batch):
            return None
        N, tokens, positions, slots, tables = self._inputs(batch)
        rows, at = self._rows(tokens.shape[0], logits_at)
        logits_LV, h_PD = self._run(tokens, positions, slots, tables, *([] if rows is None else [rows]))
        logits = logits_LV[at]
        return (logits, h_PD[:N]) if return_hidden else logits


class CompiledMTPStep(CompiledStep):
    """The MTP modules' step, compiled per depth like the target's: `__call__(depth, batch, h_prev_ND,
    logits_at)` gives (h_ND, logits (L, V)), or None when the batch does not fit a graph (then the engine runs
    runner.mtp_forward)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, experts: dict[int, GroupedExperts],
                 block_size: int, buckets: tuple[int, ...] = BUCKETS, autotune: bool = True,
                 max_tokens: int | None = None):  # fmt: skip
        super().__init__(model, cache, experts, block_size, buckets, autotune, max_tokens)
        # the main layers' stacks the base class looked up are not this step's: it runs the MTP blocks only
        self.experts = {id(m): experts.get(id(m)) or GroupedExperts(m) for m in model.mtp_moe_layers()}
        self.experts |= fused_projections(m.block for m in model.mtp)
        self._fns: dict[int, Callable] = {}

    @property
    def compiled(self) -> bool:
        return bool(self._fns)

    def fits(self, batch: Batch) -> bool:
        return bool(self._fns) and batch.tokens_N.shape[0] <= self.max_tokens

    def compile(self) -> float:
        start = time.perf_counter()
        D = self.model.config.d_model
        for depth in range(1, len(self.model.mtp) + 1):

            def step(tokens_P, h_prev_PD, positions_P, slots_P, tables_PM, rows_L=None, depth=depth):
                return static_mtp_forward(self.model, depth, self.cache, self.experts, self.block_size,
                                          tokens_P, h_prev_PD, positions_P, slots_P, tables_PM, rows_L)  # fmt: skip

            self._fns[depth] = self._trace(step, lambda n: (torch.zeros(n, D, device=self.device),))
        self.compile_seconds = time.perf_counter() - start
        log.info("compiled the MTP step for %d depths and %s tokens in %.1f s", len(self.model.mtp), self.sizes,
                 self.compile_seconds)  # fmt: skip
        return self.compile_seconds

    @torch.no_grad()
    def __call__(self, depth: int, batch: Batch, h_prev_ND: torch.Tensor, logits_at: list[int]):
        if not self.fits(batch):
            return None
        N, tokens, positions, slots, tables = self._inputs(batch)
        h_prev = h_prev_ND.new_zeros(tokens.shape[0], h_prev_ND.shape[1])
        h_prev[:N] = h_prev_ND
        rows, at = self._rows(tokens.shape[0], logits_at)
        h_PD, logits_LV = self._fns[depth](tokens, h_prev, positions, slots, tables, *([] if rows is None else [rows]))
        return h_PD[:N], logits_LV[at]
