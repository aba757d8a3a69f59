"""llama.cpp as the peer a user would serve with: continuous batching over parallel slots, and perplexity.

`LlamaCppServer` drives llama.cpp's C API (through llama-cpp-python's low-level bindings, built by
bench/build_llama_cpp.py) the way `llama-server --parallel C` does: C slots, each a sequence id in one KV
cache; every step is one `llama_decode` of a batch holding each decoding slot's next token and the prompt
of any slot that just took a request (its logits at the prompt's last position only); a slot that finishes
frees its sequence (`llama_memory_seq_rm`) and takes the next waiting request. Greedy sampling by llama.cpp's
own sampler. At C = 1 it is batch-1 decoding. As llama-server does by default (`cache_prompt`), a slot keeps its
last request's tokens in the cache and a new request reuses the prefix it shares with them (a system prompt).

The llama-server binary itself is not built: llama-cpp-python's wheel ships the library, and its Python
server has no parallel slots. This is the same library and the same batching a llama-server slot loop runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def available() -> str | None:
    """None when llama.cpp can be used here, else why not (for a "not measured" cell)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}): run make llama-cpp"
    return None


class LlamaCppServer:
    def __init__(self, gguf: str | Path, slots: int, max_tokens_per_seq: int, threads: int, cache_prompt: bool = True):
        import llama_cpp as ll

        self.ll, self.slots, self.cache_prompt = ll, slots, cache_prompt
        self.slot_tokens: dict[int, list[int]] = {}
        """Per slot, the tokens its sequence holds in the KV cache."""
        self.cached_tokens = 0
        """Prompt tokens taken from a slot's cache instead of decoded (cache_prompt)."""
        params = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"{gguf}: llama.cpp could not load it")
        cp = ll.llama_context_default_params()
        cp.n_ctx = slots * max_tokens_per_seq
        cp.n_batch = cp.n_ubatch = max(512, slots * max_tokens_per_seq)
        cp.n_seq_max = slots
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"{gguf}: llama.cpp could not create a context of {cp.n_ctx} positions")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(cp.n_batch, 0, slots)
        self.sampler = ll.llama_sampler_init_greedy()

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_sampler_free(self.sampler)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)

    def run(self, prompts: list[list[int]], new_tokens: int, on_token: Callable[[int, int], None]) -> list[list[int]]:
        """Serve every prompt (greedy, exactly new_tokens each) over the slots; on_token(request, token) as each
        token is sampled. Returns the tokens per request."""
        ll, batch = self.ll, self.batch
        waiting = list(range(len(prompts)))
        outputs: list[list[int]] = [[] for _ in prompts]
        active: dict[int, list] = {}  # slot -> [request, position, last token]
        while waiting or active:
            n, at = 0, {}
            for slot in range(self.slots):
                if slot not in active and waiting:
                    request = waiting.pop(0)
                    prompt = prompts[request]
                    keep = self._reuse(slot, prompt)
                    for i in range(keep, len(prompt)):
                        self._put(n, prompt[i], i, slot, i == len(prompt) - 1)
                        n += 1
                    active[slot] = [request, len(prompt), None]
                    at[slot] = n - 1
                elif slot in active:
                    request, pos, last = active[slot]
                    self._put(n, last, pos, slot, True)
                    self.slot_tokens[slot].append(last)
                    active[slot][1] += 1
                    at[slot] = n
                    n += 1
            batch.n_tokens = n
            if ll.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for slot, index in at.items():
                request = active[slot][0]
                token = ll.llama_sampler_sample(self.sampler, self.ctx, index)
                outputs[request].append(token)
                on_token(request, token)
                active[slot][2] = token
                if len(outputs[request]) >= new_tokens:
                    del active[slot]
        return outputs

    def _reuse(self, slot: int, prompt: list[int]) -> int:
        """Positions of the slot's cached tokens that the new prompt starts with (llama-server's cache_prompt),
        at most all but the prompt's last token; the rest of the slot's sequence is removed."""
        cached = self.slot_tokens.get(slot, [])
        keep = 0
        if self.cache_prompt:
            limit = min(len(cached), len(prompt) - 1)
            while keep < limit and cached[keep] == prompt[keep]:
                keep += 1
        self.ll.llama_memory_seq_rm(self.memory, slot, keep, -1)
        self.slot_tokens[slot] = list(prompt)
        self.cached_tokens += keep
        return keep

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq


def llama_cpp_perplexity(path: str | Path, rows: torch.Tensor, threads: int) -> float:
    """Perplexity of a GGUF file on held-out token rows (logits at every position, one row at a time)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=rows.shape[1], n_threads=threads, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for row in rows.tolist():
        llm.reset()
        llm.eval(row[:-1])
        logits = torch.from_numpy(np.array(llm.scores[: len(row) - 1]))
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
        count += len(row) - 1
    return math.exp(nll / count)
