"""Frugal inference. The runtime (what the release wheel ships): generation with a KV cache (`generate`),
INT8/INT4 weight-only quantized layers (`quantize`), the INT8 KV cache (`kv_cache`), lossless speculative
decoding with adaptive gamma (`speculative`), the verified package (`package`), the OpenAI-compatible server
(`serve`) and the lm-evaluation-harness adapter (`lm_eval_adapter`).

Build-time tools beside it: AWQ calibration (`awq`), the quantized_model build (`quantized_model`),
perplexity and memory measurement (`evaluate`), the benchmark (`benchmark`), the release (`release`) and the
demo's ending (`demo`). None of them imports `training/` or `pipelines/` into the runtime.
"""
