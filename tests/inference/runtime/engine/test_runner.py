"""The paged forward against the eager one: the same logits for sequences packed together, prefilled in
chunks and decoded, with their blocks scattered over the cache, for each KV cache format."""

import pytest
import torch

from inference.runtime.engine import runner
from inference.runtime.engine.engine import EngineConfig, _cache_for
from inference.runtime.engine.runner import Batch, Run
from inference.runtime.generate import Generator
from inference.runtime.kv_cache import calibrate_channel_scales, use_int8_kv_cache
from tests.inference.runtime.test_speculative import models


@pytest.mark.parametrize("kv_cache", ["fp32", "int8", "int8-channel"])
def test_packed_chunked_decoding_matches_the_eager_forward(kv_cache):
    target, _ = models()
    if kv_cache == "int8":
        use_int8_kv_cache(target)
    elif kv_cache == "int8-channel":
        use_int8_kv_cache(target, calibrate_channel_scales(target, [torch.randint(0, 512, (2, 40))]))
    torch.manual_seed(1)
    a, b = torch.randint(0, 512, (14,)).tolist(), torch.randint(0, 512, (9,)).tolist()
    cache = _cache_for(Generator(target), EngineConfig(block_size=4), num_blocks=16)
    cache.zero_blocks(list(range(16)))  # what the engine does as it first hands a block out
    tables = {"a": [7, 2, 11, 5], "b": [3, 14, 9]}  # scattered, interleaved blocks
    # step 1: a's first chunk and all of b; step 2: a's second chunk and b's first decode; then decodes
    steps = [
        [("a", a[:6], 0), ("b", b[:8], 0)],
        [("a", a[6:12], 6), ("b", b[8:9], 8)],
        [("a", a[12:13], 12)],
        [("b", [5], 9), ("a", a[13:14], 13)],
    ]
    got = {"a": {}, "b": {}}
    for step in steps:
        batch = Batch.pack([Run(toks, start, tables[name]) for name, toks, start in step], 4)
        logits = runner.forward(target, batch, cache, list(range(len(batch.tokens_N))))
        at = 0
        for name, toks, start in step:
            for i in range(len(toks)):
                got[name][start + i] = logits[at + i]
            at += len(toks)
    full = {"a": a, "b": [*b, 5]}
    with torch.no_grad():
        for name, tokens in full.items():
            eager_cache = target.new_cache(1, len(tokens))
            ref = target(torch.tensor([tokens]), 0, eager_cache)[0]
            for pos, logits in got[name].items():
                assert torch.allclose(logits, ref[pos], atol=2e-4, rtol=1e-4), (name, pos)
