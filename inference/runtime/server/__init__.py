"""frugal-serve, the OpenAI-compatible server, split as vLLM's OpenAI entry point is:

    protocol.py   the wire format: errors, request fields, response and chunk objects, usage, log-probs
    serving.py    the serving logic: validation into engine requests, detokenizing, stop strings, and
                  turning engine outputs into responses and streams
    app.py        the FastAPI app under uvicorn: routes, the API key, metrics (prometheus_client), the CLI

The engine that runs the model is inference.runtime.engine.
"""
