"""frugal-serve: an OpenAI-compatible server for an inference package, FastAPI under uvicorn.

    frugal-serve [--package PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 16]
                 [--max-queue 64] [--max-step-tokens 256] [--block-size 16] [--kv-blocks N]
                 [--no-prefix-caching] [--no-speculative] [--proposer auto|mtp|draft|none]
                 [--kv-cache fp32|int8|int8-channel]
                 [--request-timeout 600] [--threads N] [--no-compile | --fast-compile] [--compile-sizes 1,4,8,16]
    (from a checkout: python -m inference.runtime.serve --package PATH ...)

Without --package it serves the package bundled next to the module (a release wheel carries it as
inference/runtime/package/). It binds 127.0.0.1 unless told otherwise; --port 0 picks a free port. Once
ready it prints one line, "serving NAME on http://HOST:PORT".

Endpoints:

    GET  /v1/models                the package, as the one model (OpenAI list format); /v1/models/NAME too
    POST /v1/completions           prompt: a string, a list of strings, token ids, or a list of token id lists
    POST /v1/chat/completions      messages: [{role: system|user|assistant, content: str}]
    POST /tokenize, /detokenize    vLLM's tokenizer endpoints; GET /tokenizer_info (lm_eval's remote tokenizer)
    GET  /health                   {"status": "ok", "model", "running", "waiting", ...}: never needs a key
    GET  /metrics                  Prometheus text (prometheus_client)

Parameters: model, max_tokens (max_completion_tokens for chat), temperature (default 1; 0 = greedy),
top_p, seed, stop (up to 4 strings), n, stream and stream_options.include_usage, frequency_penalty,
presence_penalty, logit_bias, logprobs (completions: how many alternatives; chat: logprobs true and
top_logprobs), echo (completions; with logprobs, the prompt tokens' log-probs too), user (ignored), and
vLLM's ignore_eos (decode exactly max_tokens, as serving benchmarks do). Null
means the default; any other field is refused (400, naming it). Usage reports prefix-cache hits in
usage.prompt_tokens_details.cached_tokens, as OpenAI does.

The chat template is plain text, one line per message and an open assistant turn ("System: ...\\nUser:
...\\nAssistant:"), and "\\nUser:" is an implicit stop string.

Requests are batched by inference.runtime.engine, in a process of its own (inference.runtime.engine.process; the package
is verified and loaded there): continuous batching over a paged KV cache with prefix caching, and
speculative decoding unless --no-speculative: with the target's own MTP modules when the package has them, else
with its draft (--proposer picks one). At most --max-queue requests wait
for a place in the batch; another gets 429 (rate_limit_error, queue_full). A request past
--request-timeout seconds ends with 504 (request_timeout) and frees its blocks; a client that disconnects
frees them at the next step.

With --api-key KEY (or FRUGAL_API_KEY) every endpoint but /health needs "Authorization: Bearer KEY" (401
otherwise); keys are compared in constant time and never logged. Binding a non-loopback address without a
key prints a warning.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 for invalid JSON, unknown
fields, bad values, a prompt or max_tokens beyond the context; 401 without the key; 404 for an unknown model
or path; 405 for a wrong method; 413 for a body over 1 MiB; 429 for a full queue; 500 if decoding failed;
504 past the time limit. The package is verified and loaded by inference.runtime.package (safetensors and JSON:
nothing is unpickled).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from inference.runtime.engine.compiled import BUCKETS
from inference.runtime.engine.engine import PROPOSERS, Engine, EngineConfig
from inference.runtime.engine.process import EngineProcess
from inference.runtime.generate import EOS_TOKEN, PAD_TOKEN
from inference.runtime.kv_cache import KV_CACHES
from inference.runtime.package import bundled_package
from inference.runtime.server import protocol
from inference.runtime.server.protocol import ApiError
from inference.runtime.server.serving import Delta, Finish, GenerationRequest, Serving

GET_PATHS = ("/v1/models", "/health", "/metrics", "/tokenizer_info")
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
OPEN_PATHS = ("/health",)
"""What answers without the API key (load balancers probe it)."""
disable_created_metrics()  # no *_created series: counters are read as rates, as vLLM's are


class EngineCollector:
    """The engine's counters and gauges, read at scrape time."""

    def __init__(self, engine: Engine | EngineProcess):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        s, kv = snap.stats, snap.kv_blocks

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("frugal_num_requests_running", "requests in the batch", snap.running)
        yield gauge("frugal_num_requests_waiting", "requests queued for a place in the batch", snap.waiting)
        yield gauge("frugal_kv_cache_usage_ratio", "KV blocks held by requests / all blocks", kv["used"] / kv["total"])
        blocks = GaugeMetricFamily("frugal_kv_cache_blocks", "KV blocks by state", labels=["state"])
        for state in ("used", "cached", "free"):
            blocks.add_metric([state], kv[state])
        yield blocks
        yield counter("frugal_prompt_tokens", "prompt tokens computed (prefix-cache hits excluded)", s.prompt_tokens)
        yield counter("frugal_generation_tokens", "tokens generated", s.generated_tokens)
        yield counter("frugal_prefix_cache_queries", "prompt tokens looked up in the prefix cache", snap.prefix_queries)
        yield counter("frugal_prefix_cache_hits", "prompt tokens found in the prefix cache", snap.prefix_hits)
        finished = CounterMetricFamily("frugal_engine_finished", "requests that left the batch", labels=["reason"])
        for reason, n in sorted(s.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        yield counter("frugal_engine_steps", "engine steps", s.steps)
        yield counter("frugal_engine_busy_seconds", "seconds the engine spent in steps", s.busy_seconds)
        scheduled = sum(k * v for k, v in s.batch_sizes.items())
        yield counter("frugal_engine_scheduled_requests", "requests per step, summed over steps", scheduled)
        rounds = CounterMetricFamily("frugal_spec_decode_rounds", "decoding rounds per request", labels=["kind"])
        rounds.add_metric(["speculative"], s.spec_rounds)
        rounds.add_metric(["plain"], s.plain_rounds)
        yield rounds
        yield counter("frugal_spec_decode_num_draft_tokens", "tokens the draft proposed", s.proposed)
        yield counter("frugal_spec_decode_num_accepted_tokens", "proposals the target accepted", s.accepted)
        yield gauge("frugal_spec_decode_gamma", "gamma the adaptive policy chose last (0: plain steps)", s.last_gamma)


class Metrics:
    """prometheus_client metrics of one server (its own registry, so tests can run several)."""

    def __init__(self, engine: Engine | EngineProcess):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter(
            "frugal_requests", "choices answered in full", ["finish_reason"], registry=self.registry
        )
        self.errors = Counter("frugal_http_errors", "error responses", ["status"], registry=self.registry)
        self.ttft = Histogram("frugal_time_to_first_token_seconds", "time to the first token", buckets=latency,
                              registry=self.registry)  # fmt: skip
        self.tpot = Histogram("frugal_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=latency, registry=self.registry)  # fmt: skip
        self.e2e = Histogram("frugal_e2e_request_latency_seconds", "request latency", buckets=latency,
                             registry=self.registry)  # fmt: skip

    def observe(self, request: GenerationRequest, ttft: float, e2e: float, tokens: int, finish: str) -> None:
        self.requests.labels(finish).inc()
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if tokens > 1:
            self.tpot.observe((e2e - ttft) / (tokens - 1))


def error_response(error: ApiError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status)


async def read_body(request: Request) -> bytes:
    """The body, up to MAX_BODY_BYTES; a longer one is answered 413 after reading and dropping it (up to 16
    times the limit), so that a client still sending gets the answer rather than a reset connection."""
    limit = protocol.MAX_BODY_BYTES
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        elif total > 16 * limit:
            break
    if total > limit:
        raise ApiError(413, f"the request body is {total}+ bytes; the limit is {limit}", None, "body_too_large")
    return b"".join(chunks)


def json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return body


def build_app(engine, name: str, tokenizer, api_key: str | None = None, request_timeout: float | None = None):
    """The FastAPI app serving model `name` from `engine`, an EngineProcess (inference.runtime.engine.process), which
    starts and stops with the app; a test may pass an Engine of this process that it steps itself, and not
    run the app's lifespan."""
    metrics = Metrics(engine)
    serving = Serving(engine, tokenizer, name, request_timeout, observe=metrics.observe)
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="frugal-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if expected is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(
                    ApiError(401, "a valid API key is required: send Authorization: Bearer KEY", None,
                             "invalid_api_key", "authentication_error"), metrics,
                )  # fmt: skip
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error, metrics)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        path = request.url.path
        if error.status_code == 405 or (error.status_code == 404 and path in GET_PATHS + POST_PATHS):
            allow = "POST" if path in POST_PATHS else "GET"
            return error_response(ApiError(405, f"{request.method} is not allowed on {path}: use {allow}", None,
                                           "method_not_allowed"), metrics)  # fmt: skip
        if error.status_code == 404:
            return error_response(
                ApiError(404, f"no such endpoint: {request.method} {path}", None, "not_found"), metrics
            )
        return error_response(ApiError(error.status_code, str(error.detail)), metrics)

    def model_object() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "frugal",
                "max_model_len": engine.max_seq_len}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return model_object()

    @app.get("/health")
    async def health():
        snap = engine.snapshot()
        return {
            "status": "ok", "model": name, "running": snap.running, "waiting": snap.waiting,
            "max_batch": engine.config.max_batch, "max_queue": engine.config.max_queue, "kv_blocks": snap.kv_blocks,
            "proposer": engine.proposer,
        }  # fmt: skip

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": None,
                "pad_token": PAD_TOKEN, "model_max_length": engine.max_seq_len}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = json_object(await read_body(request))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        ids = tokenizer.encode(prompt).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = json_object(await read_body(request))
        tokens = body.get("tokens")
        vocab = tokenizer.get_vocab_size()
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(serving.parse(json_object(await read_body(request)), chat=False), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(serving.parse(json_object(await read_body(request)), chat=True), request)

    async def answer(req: GenerationRequest, request: Request):
        # a stream learns of a client that left from Starlette cancelling it; a plain response polls
        events = serving.generate(req, None if req.stream else request.is_disconnected)
        if req.stream:
            try:  # an error before the first event still gets its own status
                first = await anext(events)
            except StopAsyncIteration:
                first = None
            return StreamingResponse(stream(req, first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        finishes: dict[int, Finish] = {}
        async for event in events:
            if isinstance(event, Delta):
                texts.setdefault(event.index, []).append(event.text)
                logprobs.setdefault(event.index, []).extend(event.logprobs)
            else:
                finishes[event.index] = event
        choices = []
        for i in sorted(finishes):
            text = "".join(texts.get(i, []))
            lp = format_logprobs(req, logprobs.get(i, []))
            if req.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finishes[i].reason})  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finishes[i].reason})
        return {"id": req.id, "object": "chat.completion" if req.chat else "text_completion", "created": req.created,
                "model": name, "choices": choices, "usage": total_usage(req, finishes)}  # fmt: skip

    def format_logprobs(req: GenerationRequest, entries: list):
        if req.params.logprobs is None:
            return None
        if req.chat:
            return protocol.chat_logprobs(entries)
        tops = [None if lp is None else {**dict(top), token: lp} for token, lp, top in entries]
        return protocol.completion_logprobs([t for t, _, _ in entries], [lp for _, lp, _ in entries], tops)

    def total_usage(req: GenerationRequest, finishes: dict[int, Finish]) -> dict:
        firsts = [f for i, f in finishes.items() if i % req.n == 0]  # the prompt counts once, not per choice
        return protocol.usage(sum(f.prompt_tokens for f in firsts), sum(f.completion_tokens for f in finishes.values()),
                              sum(f.cached_tokens for f in firsts))  # fmt: skip

    async def stream(req: GenerationRequest, first, events) -> AsyncIterator[bytes]:
        base = {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
                "created": req.created, "model": name}  # fmt: skip

        def chunk(index: int, text: str | None, entries: list, finish: str | None = None) -> bytes:
            lp = format_logprobs(req, entries) if entries else None
            if req.chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

        finishes: dict[int, Finish] = {}
        try:
            if req.chat:
                for i in range(len(req.prompts) * req.n):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}  # fmt: skip
                    yield b"data: " + json.dumps({**base, "choices": [role]}).encode() + b"\n\n"
            pending = [first] if first is not None else []
            while True:
                if pending:
                    event = pending.pop()
                else:
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        break
                if isinstance(event, Delta):
                    yield chunk(event.index, event.text, event.logprobs)
                else:
                    finishes[event.index] = event
                    yield chunk(event.index, None, [], event.reason)
            if req.include_usage:
                yield (
                    b"data: "
                    + json.dumps({**base, "choices": [], "usage": total_usage(req, finishes)}).encode()
                    + b"\n\n"
                )
            yield b"data: [DONE]\n\n"
        except ApiError as e:  # the status line is gone: the error travels as an event
            metrics.errors.labels(str(e.status)).inc()
            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
        finally:
            await events.aclose()  # a client that left: abort its choices now

    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frugal-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="the package folder (default: the one a release wheel carries)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the line printed says which)")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $FRUGAL_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoding together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    parser.add_argument("--max-step-tokens", type=int, default=256, help="new tokens per step (prompts are chunked)")
    parser.add_argument("--block-size", type=int, default=16, help="positions per KV block")
    parser.add_argument("--kv-blocks", type=int, help="KV blocks (default: 2 x max-batch full contexts)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="never reuse cached prompt blocks")
    parser.add_argument("--no-speculative", action="store_true", help="decode with the target alone")
    parser.add_argument(
        "--proposer", choices=PROPOSERS, default="auto",
        help="speculative proposals from the target's MTP modules or the draft model (auto: MTP when present)",
    )  # fmt: skip
    parser.add_argument("--kv-cache", choices=KV_CACHES, help="override the package's KV cache")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="run every step eager (no torch.compile at start)")
    parser.add_argument(
        "--fast-compile",
        action="store_true",
        help="compile without inductor's autotuning: a faster start, slower steps",
    )
    parser.add_argument(
        "--compile-sizes",
        type=_sizes,
        default=",".join(map(str, BUCKETS)),
        help="token counts of the compiled step's static graphs, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-max-tokens",
        type=int,
        default=None,
        help="steps past the largest compile size, up to this many tokens, run one compiled graph of dynamic size "
        "(default: --max-step-tokens; the largest compile size: none, they run eager)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_step_tokens", "block_size", "kv_blocks", "compile_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.request_timeout <= 0:
        parser.error(f"--request-timeout must be > 0, got {args.request_timeout}")
    api_key = args.api_key or os.environ.get("FRUGAL_API_KEY") or None
    if api_key is None and not _loopback(args.host):
        print(f"warning: serving on {args.host}, beyond this machine, without an API key: anyone who can reach "
              "it can use it (set --api-key or FRUGAL_API_KEY)", file=sys.stderr, flush=True)  # fmt: skip
    package_dir = args.package
    if package_dir is None:
        try:
            package_dir = bundled_package()
        except ValueError as e:
            parser.error(f"--package is required: {e}")
    config = EngineConfig(
        max_batch=args.max_batch, max_queue=args.max_queue, max_step_tokens=args.max_step_tokens,
        block_size=args.block_size, kv_blocks=args.kv_blocks, prefix_caching=not args.no_prefix_caching,
        compile_sizes=args.compile_sizes, compile_max_tokens=args.compile_max_tokens,
        compile_autotune=not args.fast_compile, proposer=args.proposer,
    )  # fmt: skip
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        parser.error(f"cannot bind {args.host}:{args.port}: {e}")
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    try:  # the engine verifies and loads the package in a process of its own
        if not args.no_compile:
            print(f"compiling the step for {len(args.compile_sizes)} batch sizes and the larger steps (--no-compile "
                  "skips it; inductor's cache keeps what it can for the next start)",
                  file=sys.stderr, flush=True)  # fmt: skip
        engine = EngineProcess(package_dir, args.kv_cache, config, not args.no_speculative, args.threads,
                               compile=not args.no_compile)  # fmt: skip
    except ValueError as e:
        sock.close()
        parser.error(str(e))
    app = build_app(engine, engine.name, engine.tokenizer, api_key, args.request_timeout)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_keep_alive=120))
    if engine.compile_seconds is not None:
        print(f"compiled the decode step in {engine.compile_seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"serving {engine.name} on http://{host}:{port}", flush=True)  # the socket already queues connections
    server.run(sockets=[sock])
