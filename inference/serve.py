"""An OpenAI-compatible HTTP server for an inference package, on the standard library alone.

    frugal-serve [--package PATH] [--host 127.0.0.1] [--port 8000] [--no-speculative]
                 [--kv-cache fp32|int8|int8-channel] [--max-queue 64] [--threads N]
    (from a checkout: python -m inference.serve --package PATH ...)

Without --package it serves the package bundled next to the module (a release wheel carries it as
frugal_runtime/package/). It binds 127.0.0.1 unless told otherwise; --port 0 picks a free port. Once
ready it prints one line, "serving NAME on http://HOST:PORT".

Endpoints:

    GET  /v1/models                the package, as the one model (OpenAI list format); /v1/models/NAME too
    POST /v1/completions           prompt: a string (or a list of one string)
    POST /v1/chat/completions      messages: [{role: system|user|assistant, content: str}]
    GET  /health                   {"status": "ok", "model", "queue_depth", "running", "max_queue"}
    GET  /metrics                  JSON counters; /metrics?format=prometheus for Prometheus text

Both generation endpoints take model (must be the package's name, else 404 model_not_found), max_tokens
(max_completion_tokens for chat), temperature (default 1, as OpenAI; 0 = greedy), top_p in (0, 1], seed
(repeatable sampling), stop (a string or up to 4 strings), n (1 only), stream and
stream_options.include_usage; null means the default. Any other field is refused (400, naming it).
max_tokens defaults to 16 for completions and to what the context leaves for chat; the context is the
model's max_seq_len, less gamma when decoding speculatively (the verification pass needs gamma positions
past the last token).

The chat template is plain text, one line per message and an open assistant turn:

    System: You are terse.
    User: Hello
    Assistant:

and "\\nUser:" is an implicit stop string, so the model's answer ends where it would start the next turn.

Decoding: speculative (the package's draft proposes gamma tokens, see inference.speculative) when the
package has a draft, unless --no-speculative; lossless, so greedy output is the target's own. gamma adapts
per round (down to plain steps when the draft is rarely right), except for requests with a seed, whose
random draws must repeat: they keep the package's gamma. Text is decoded incrementally: the whole id list
is decoded after each token and the new suffix released, since in byte-level BPE one character can span
tokens; a tail is held back while it ends in an incomplete UTF-8
sequence or could still begin a stop string, so a stream never shows text past a stop string. The text is
cut at the first stop string; finish_reason is "stop" for a stop string or the end-of-sequence token,
"length" when max_tokens was reached. Streams are Server-Sent Events (`data: {chunk}`, then
`data: [DONE]`) of text_completion or chat.completion.chunk objects, as the openai client reads them.

Concurrency: HTTP requests are handled on threads, but one worker thread runs the model: requests are
validated and tokenized on their own thread, then queued (FIFO) for the worker, so model code never runs on
two threads at once. At most --max-queue requests wait behind the one decoding; another gets 429
(rate_limit_error, code queue_full).

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}, and close the connection: 400
for invalid JSON, unknown fields, bad values, a prompt or max_tokens beyond the context; 404 for an unknown
model or path; 405 for a wrong method; 411 for a chunked body (Content-Length is required); 413 for a body
over 1 MiB; 500 if decoding fails (the worker carries on). The package is verified and loaded by
inference.package (safetensors and JSON: nothing is unpickled). Runtime dependencies: torch, tokenizers,
safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from inference.generate import Generator, SamplingConfig
from inference.kv_cache import KV_CACHES
from inference.package import Package, bundled_package, load_package
from inference.speculative import SpeculativeGenerator

"""Where a release wheel puts the package folder: frugal_runtime/package/ beside frugal_runtime/inference/."""
MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions (chat defaults to what the context leaves)."""
MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = "\nUser:"
"""Where the chat template's next user turn would begin: an implicit stop string for chat."""

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
GET_PATHS = ("/v1/models", "/health", "/metrics")
POST_PATHS = ("/v1/completions", "/v1/chat/completions")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def chat_prompt(messages: list[dict]) -> str:
    """The chat template: "Role: content" per message, one per line, then an open "Assistant:" turn."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


class StopText:
    """The text of a growing list of token ids, released as it becomes final, cut at the first stop string.

    push() decodes the whole id list (byte-level BPE: a character can span tokens, so decoding token by
    token would garble it) and returns the new final suffix. Held back: trailing U+FFFD (an incomplete
    UTF-8 sequence the next token may complete) and the last len(longest stop) - 1 characters, which could
    be the start of a stop string. A stop string that is not complete yet has fewer characters than that
    in the text, so text before it is never held and text past it is never released.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max(map(len, stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            assert min(found) >= self.released, "a stop string began in text already released"
            self.text, self.stopped = self.text[: min(found)], True
            return self._release(len(self.text))
        return self._release(len(self.text.rstrip("\ufffd")) - self.hold)

    def finish(self) -> str:
        """What is still held, once no token will follow."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self.released : max(end, self.released)]
        self.released += len(delta)
        return delta


@dataclass(kw_only=True, slots=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request, tokenized, as the worker runs it."""

    chat: bool
    prompt_ids: list[int]
    sampling: SamplingConfig
    stop: tuple[str, ...]
    """Stop strings, the chat template's implicit one included."""
    stream: bool
    include_usage: bool
    """stream_options.include_usage: a last chunk with the usage and no choices."""


@dataclass(slots=True)
class Job:
    """A queued request and what the worker reports on it: ("text", delta) events, then ("done",
    finish_reason, completion_tokens) or ("error", ApiError)."""

    request: GenerationRequest
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client has gone: the worker stops decoding at the next token."""


@dataclass(slots=True)
class Metrics:
    """Counters since start; the worker and the handler threads update them under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    """Generation requests answered in full."""
    errors: Counter = field(default_factory=Counter)
    """Error responses by HTTP status."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_seconds: float = 0.0
    """Time the worker spent decoding: tokens/s = completion_tokens / busy_seconds."""


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Engine:
    """The loaded package, the request queue and the one worker thread that runs the model."""

    def __init__(self, package: Package, speculative: bool = True, max_queue: int = 64):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.package, self.name, self.tokenizer = package, package.name, package.target.tokenizer
        self.speculative = (
            SpeculativeGenerator(package.target, package.draft, package.gamma)
            if speculative and package.draft is not None
            else None
        )
        self.generator: Generator | SpeculativeGenerator = self.speculative or package.target
        models = [package.target] + ([package.draft] if self.speculative else [])
        max_seq_len = min(g.model.config.max_seq_len for g in models)
        self.context = max_seq_len - (package.gamma if self.speculative else 0)
        """Prompt + completion tokens a request may use."""
        self.context_text = f"this model's context of {self.context} tokens" + (
            f" (max_seq_len {max_seq_len} less gamma {package.gamma} for speculative decoding)"
            if self.speculative
            else ""
        )
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running = 0
        self.metrics = Metrics()
        self.created = int(time.time())
        self.started = time.monotonic()

    def start(self) -> None:
        threading.Thread(target=self._work, name="frugal-serve-worker", daemon=True).start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429, f"the server is busy: {self.max_queue} requests are queued; retry later", None, "queue_full",
                "rate_limit_error",
            ) from None  # fmt: skip
        return job

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            self.running = 1
            try:
                self._run(job)
            except Exception as e:  # a failed request must not take the worker down with it
                job.events.put(("error", ApiError(500, f"decoding failed: {type(e).__name__}: {e}")))
            finally:
                self.running = 0

    def _run(self, job: Job) -> None:
        request = job.request
        start = time.perf_counter()
        if self.speculative:  # adaptive gamma, except where a seed promises the same draws every time
            self.speculative.adaptive = request.sampling.seed is None
        try:
            tokens = self.generator.stream(request.prompt_ids, request.sampling)
        except ValueError as e:  # the generator's own checks; parse() should have caught these first
            job.events.put(("error", ApiError(400, str(e))))
            return
        text = StopText(self.tokenizer, request.stop)
        n = 0
        for token in tokens:
            n += 1
            delta = text.push(token)
            if delta:
                job.events.put(("text", delta))
            if text.stopped or job.cancelled.is_set():
                break
        delta = text.finish()
        if delta:
            job.events.put(("text", delta))
        finish = "length" if n == request.sampling.max_new_tokens and not text.stopped else "stop"
        with self.metrics.lock:
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(request.prompt_ids)
            self.metrics.completion_tokens += n
            self.metrics.busy_seconds += time.perf_counter() - start
        job.events.put(("done", finish, n))

    def parse(self, body: dict, chat: bool) -> GenerationRequest:
        """Validate a request body (OpenAI's parameters), or raise the ApiError that answers it."""
        body = {k: v for k, v in body.items() if v is not None}  # null: the parameter's default
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unsupported parameter {unknown[0]!r}", unknown[0], "unknown_parameter")
        if "model" not in body:
            raise ApiError(400, "missing required parameter 'model'", "model", "missing_required_parameter")
        if body["model"] != self.name:
            raise ApiError(
                404, f"the model {body['model']!r} does not exist: this server serves {self.name!r}", "model",
                "model_not_found",
            )  # fmt: skip
        if chat:
            prompt = chat_prompt(_messages(body.get("messages")))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string (or a list of one string)", "prompt")
        prompt_ids = self.tokenizer.encode(prompt).ids
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        left = self.context - len(prompt_ids)
        if left < 1:
            raise ApiError(
                400, f"the prompt is {len(prompt_ids)} tokens, beyond {self.context_text} (prompt and completion "
                "together)", "prompt", "context_length_exceeded",
            )  # fmt: skip
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(name)
        if max_tokens is None:
            max_tokens = left if chat else min(DEFAULT_COMPLETION_TOKENS, left)
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}", name)
        elif max_tokens > left:
            raise ApiError(
                400, f"{name} ({max_tokens}) + the prompt ({len(prompt_ids)} tokens) exceed {self.context_text}: "
                f"{name} can be at most {left} for this prompt", name, "context_length_exceeded",
            )  # fmt: skip
        temperature = body.get("temperature", 1.0)
        if not _is_number(temperature) or temperature < 0:
            raise ApiError(400, f"temperature must be a number >= 0, got {temperature!r}", "temperature")
        top_p = body.get("top_p")
        if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
            raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise ApiError(400, f"seed must be an integer in [0, 2^63), got {seed!r}", "seed")
        if body.get("n", 1) != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {body['n']!r}", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options may only hold include_usage", "stream_options")
        stop = _stop_strings(body.get("stop"))
        return GenerationRequest(
            chat=chat,
            prompt_ids=prompt_ids,
            sampling=SamplingConfig(max_new_tokens=max_tokens, temperature=float(temperature), top_p=top_p, seed=seed),
            stop=(*stop, CHAT_STOP) if chat else stop,
            stream=stream,
            include_usage=bool(options.get("include_usage")),
        )

    def health(self) -> dict:
        return {
            "status": "ok", "model": self.name, "queue_depth": self.jobs.qsize(), "running": self.running,
            "max_queue": self.max_queue,
        }  # fmt: skip

    def metrics_json(self) -> dict:
        m = self.metrics
        with m.lock:
            out = {
                "model": self.name,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "requests": m.requests,
                "errors": sum(m.errors.values()),
                "errors_by_status": {str(k): v for k, v in sorted(m.errors.items())},
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "busy_seconds": round(m.busy_seconds, 6),
                "tokens_per_second": m.completion_tokens / m.busy_seconds if m.busy_seconds else None,
                "queue_depth": self.jobs.qsize(),
            }
        stats = self.speculative.stats if self.speculative else None
        out["speculative"] = {
            "enabled": stats is not None,
            "gamma": self.package.gamma if stats else None,
            "acceptance_rate": _finite_or_none(stats.acceptance_rate) if stats else None,
            "mean_accepted_length": _finite_or_none(stats.mean_accepted_length) if stats else None,
            "rounds": stats.rounds if stats else 0,
            "proposed": stats.proposed if stats else 0,
            "accepted": stats.accepted if stats else 0,
        }
        return out

    def metrics_prometheus(self) -> str:
        m = self.metrics_json()
        spec = m["speculative"]
        rows = [
            ("frugal_requests_total", "counter", "generation requests answered in full", m["requests"]),
            ("frugal_errors_total", "counter", "error responses", m["errors"]),
            ("frugal_prompt_tokens_total", "counter", "prompt tokens of answered requests", m["prompt_tokens"]),
            ("frugal_generated_tokens_total", "counter", "tokens generated", m["completion_tokens"]),
            ("frugal_busy_seconds_total", "counter", "seconds the worker spent decoding", m["busy_seconds"]),
            ("frugal_tokens_per_second", "gauge", "tokens generated per busy second", m["tokens_per_second"]),
            ("frugal_queue_depth", "gauge", "requests waiting for the worker", m["queue_depth"]),
            ("frugal_speculative_acceptance_rate", "gauge", "accepted/proposed drafts", spec["acceptance_rate"]),
            ("frugal_speculative_mean_accepted_length", "gauge", "tokens/target pass", spec["mean_accepted_length"]),
        ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_prometheus(value)}"]
        return "\n".join(lines) + "\n"

    def model_object(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "frugal"}


def _prometheus(value: float | None) -> str:
    return "NaN" if value is None else str(value)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(400, f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ApiError(400, f"messages[{i}] must have exactly the keys role and content", f"messages[{i}]")
        if m["role"] not in CHAT_ROLES or not isinstance(m["content"], str):
            raise ApiError(
                400, f"messages[{i}]: role must be one of {CHAT_ROLES} and content a string", f"messages[{i}]"
            )
    return messages


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine):
        super().__init__(address, Handler)
        self.engine = engine


class Handler(BaseHTTPRequestHandler):
    """Routes, request bodies and response framing; the Engine does the rest."""

    protocol_version = "HTTP/1.1"  # keep-alive for plain responses; streams and errors close the connection
    server_version = "frugal-serve"
    timeout = 120  # seconds an idle connection is kept

    server: Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        engine = self.server.engine
        try:
            if url.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [engine.model_object()]})
            elif url.path.startswith("/v1/models/"):
                name = url.path.removeprefix("/v1/models/")
                if name != engine.name:
                    raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
                self._send_json(200, engine.model_object())
            elif url.path == "/health":
                self._send_json(200, engine.health())
            elif url.path == "/metrics":
                if parse_qs(url.query).get("format") == ["prometheus"]:
                    self._send(200, engine.metrics_prometheus().encode(), "text/plain; version=0.0.4")
                else:
                    self._send_json(200, engine.metrics_json())
            else:
                self._not_routed(url.path)
        except ApiError as e:
            self._send_error(e)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._body()
            if path not in POST_PATHS:
                self._not_routed(path)
            engine = self.server.engine
            job = engine.submit(engine.parse(_json_object(body), chat=path == "/v1/chat/completions"))
            self._answer(job)
        except ApiError as e:
            self._send_error(e)

    def do_PUT(self) -> None:
        try:
            self._body()
            self._not_routed(urlsplit(self.path).path)
        except ApiError as e:
            self._send_error(e)

    do_DELETE = do_PATCH = do_PUT

    def _not_routed(self, path: str) -> None:
        if path in GET_PATHS or path in POST_PATHS or path.startswith("/v1/models/"):
            allow = "POST" if path in POST_PATHS else "GET"
            raise ApiError(405, f"{self.command} is not allowed on {path}: use {allow}", None, "method_not_allowed")
        raise ApiError(404, f"no such endpoint: {self.command} {path}", None, "not_found")

    def _body(self) -> bytes:
        """The request body. One over MAX_BODY_BYTES is answered 413, after reading and dropping it (up to
        16 times the limit) so that a client still sending gets the answer rather than a reset connection."""
        length = self.headers.get("Content-Length")
        if length is None:
            if "Transfer-Encoding" in self.headers:
                raise ApiError(411, "a Content-Length header is required", None, "length_required")
            return b""
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a byte count", None, "invalid_content_length")
        n = int(length)
        if n > MAX_BODY_BYTES:
            if n <= 16 * MAX_BODY_BYTES:
                for start in range(0, n, 1 << 16):
                    self.rfile.read(min(1 << 16, n - start))
            raise ApiError(413, f"the request body is {n} bytes; the limit is {MAX_BODY_BYTES}", None, "body_too_large")
        return self.rfile.read(n)

    def _answer(self, job: Job) -> None:
        """Wait for the worker and answer: one JSON response, or an event stream once the first event is in
        (so an error before the first token still gets its own status)."""
        request, engine = job.request, self.server.engine
        first = job.events.get()
        if first[0] == "error":
            raise first[1]
        base = {
            "id": f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()),
            "model": engine.name,
        }
        if request.stream:
            self._stream(job, first, base)
            return
        pieces, event = [], first
        while event[0] == "text":
            pieces.append(event[1])
            event = job.events.get()
        if event[0] == "error":
            raise event[1]
        _, finish, n = event
        text = "".join(pieces)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
            if request.chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        self._send_json(200, {**base, "choices": [choice], "usage": _usage(len(request.prompt_ids), n)})

    def _stream(self, job: Job, event: tuple, base: dict) -> None:
        request = job.request
        base = {**base, "object": "chat.completion.chunk" if request.chat else "text_completion"}

        def chunk(delta: str | None, finish: str | None = None) -> dict:
            if request.chat:
                content = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if request.chat:
                self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})  # fmt: skip
            while event[0] == "text":
                self._event(chunk(event[1]))
                event = job.events.get()
            if event[0] == "error":  # the status line is gone: the error travels as an event
                self._event(event[1].body())
                self._count_error(event[1].status)
                return
            _, finish, n = event
            self._event(chunk(None, finish))
            if request.include_usage:
                self._event({**base, "choices": [], "usage": _usage(len(request.prompt_ids), n)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away (or stalled past the socket timeout): stop decoding for it
            job.cancelled.set()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if status >= 400:  # the body may be unread, or half read: start the next request on a fresh connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_error(self, error: ApiError) -> None:
        self._count_error(error.status)
        self._send_json(error.status, error.body())

    def _count_error(self, status: int) -> None:
        metrics = self.server.engine.metrics
        with metrics.lock:
            metrics.errors[status] += 1

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unsupported method) in OpenAI's shape."""
        self._send_error(ApiError(code, message or explain or "bad request"))


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return body


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frugal-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="the package folder (default: the one a release wheel carries)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the line printed says which)")
    parser.add_argument("--no-speculative", action="store_true", help="decode with the target alone")
    parser.add_argument("--kv-cache", choices=KV_CACHES, help="override the package's KV cache")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    package_dir = args.package
    if package_dir is None:
        try:
            package_dir = bundled_package()
        except ValueError as e:
            parser.error(f"--package is required: {e}")
    if args.max_queue < 1:
        parser.error(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        package = load_package(package_dir, kv_cache=args.kv_cache)
    except ValueError as e:
        parser.error(str(e))
    engine = Engine(package, speculative=not args.no_speculative, max_queue=args.max_queue)
    server = Server((args.host, args.port), engine)
    engine.start()
    host, port = server.server_address[:2]
    print(f"serving {package.name} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
