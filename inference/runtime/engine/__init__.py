"""Frugal's serving engine: continuous batching over a paged KV cache with prefix caching, and batched
speculative decoding.

    block_pool.py   fixed-size KV blocks: free list, reference counts, prefix hashes, LRU eviction
    paged_cache.py  the cache tensors of one model (fp32, INT8 per token, INT8 per channel), read and
                    written through block tables
    runner.py       one forward of a model over a packed batch of sequences (prefill chunks and decodes)
    sampler.py      per-request logits processing (penalties, logit_bias), sampling and log-probs
    scheduler.py    the iteration-level scheduler: which requests run this step and how many tokens each
    spec_decode.py  the draft's batched proposals and their per-request verification
    engine.py       the loop that ties them together, requests in and outputs out, and its metrics

The eager `inference.runtime.generate.Generator` and `inference.runtime.speculative.SpeculativeGenerator` stay as the
references the engine is tested against.
"""
