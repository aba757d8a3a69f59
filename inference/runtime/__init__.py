"""Frugal's inference runtime: everything a served model runs, and what a release wheel ships as it is.

    generate.py         generation with a KV cache (`Generator`), the eager reference
    speculative.py      lossless speculative decoding with a draft model and adaptive gamma, the eager reference
    quantize.py         INT8/INT4 weight-only quantized layers (a module swap) and loading a quantized model
    kv_cache.py         the INT8 KV cache of the eager path
    package.py          the verified package folder (manifest.json, sha256 of every file) and its loading
    engine/             the serving engine: continuous batching, paged KV cache, prefix caching, batched
                        speculative decoding and the compiled decode step
    server/             the OpenAI-compatible server (FastAPI under uvicorn), run by serve.py
    lm_eval_adapter.py  the lm-evaluation-harness adapter

It imports only itself, `model` (config, transformer, io) and `kernels`; never training, pipelines, assets or
inference's build-time tools. tests/inference/test_release.py checks that closure, and installs the wheel into
a fresh virtual environment to import every module there.
"""
