"""Frugal inference. The runtime (what the release wheel ships): generation with a KV cache (`generate`),
INT8/INT4 weight-only quantized layers (`quantize`), the INT8 KV cache (`kv_cache`), lossless speculative
decoding with adaptive gamma (`speculative`), the verified package (`package`), the serving engine
(`engine`: continuous batching, paged KV cache, prefix caching, batched speculative decoding), the
OpenAI-compatible server (`server`, run as `serve`) and the lm-evaluation-harness adapter
(`lm_eval_adapter`). `generate` and `speculative` are the eager references the engine is tested against.

Build-time tools beside it: AWQ calibration (`awq`), the quantized_model build (`quantized_model`),
perplexity and memory measurement (`evaluate`), the benchmark (`benchmark`), the release (`release`) and the
demo's ending (`demo`). None of them imports `training/` or `pipelines/` into the runtime.
"""
