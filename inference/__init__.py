"""Frugal inference. The runtime, `inference.runtime`, is what the release wheel ships as it is: generation
with a KV cache, INT8/INT4 quantized layers, the INT8 KV cache, lossless speculative decoding, the verified
package, the serving engine (continuous batching, paged KV cache, prefix caching, the compiled decode step),
the OpenAI-compatible server and the lm-evaluation-harness adapter. It imports neither `training/` nor
`pipelines/`.

Build-time tools beside it: AWQ calibration (`awq`), the quantized_model build (`quantized_model`),
perplexity and memory measurement (`evaluate`), the benchmark (`benchmark`), GGUF export (`gguf_export`), the
release (`release`) and the demo's ending (`demo`).
"""
