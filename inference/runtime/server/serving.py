"""The serving logic between the HTTP app and the engine: a request body is validated into engine requests
(one per prompt and choice), and the engine's token outputs come back as text, cut at stop strings, as one
response or as stream chunks.

Text is decoded incrementally (StopText): the whole id list is decoded after each token and the new suffix
released, since in byte-level BPE one character can span tokens; a tail is held back while it ends in an
incomplete UTF-8 sequence or could still begin a stop string, so a stream never shows text past a stop
string. When a stop string appears the engine is told to stop that request at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from inference.runtime.engine.engine import Engine, QueueFull
from inference.runtime.engine.sampler import SamplingParams
from inference.runtime.engine.scheduler import SequenceOutput
from inference.runtime.server import protocol
from inference.runtime.server.protocol import ApiError


class StopText:
    """The text of a growing list of token ids, released as it becomes final, cut at the first stop string.

    push() decodes the whole id list and returns the new final suffix. Held back: trailing U+FFFD (an
    incomplete UTF-8 sequence the next token may complete) and the last len(longest stop) - 1 characters,
    which could be the start of a stop string. A stop string that is not complete yet has fewer characters
    than that in the text, so text before it is never held and text past it is never released.
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
    """A validated /v1/completions or /v1/chat/completions request, tokenized."""

    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    """Stop strings, the chat template's implicit one included."""
    stream: bool
    include_usage: bool
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


@dataclass(slots=True)
class Delta:
    """New text for choice `index`, and the log-probs of the tokens it came from: (token, lp, top)."""

    index: int
    text: str
    logprobs: list[tuple[str, float | None, list[tuple[str, float]]]]


@dataclass(slots=True)
class Finish:
    index: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class _Choice:
    request_id: str
    text: StopText
    tokens: int = 0
    done: bool = False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Relay:
    """Outputs from the engine's thread to the event loop, with one wake-up per batch of outputs rather than
    one per output: a step delivers to every request in the batch at once, and each call_soon_threadsafe
    wakes the loop (and takes the GIL from the engine) separately."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def send(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.pending.append((queue, item))
            first = len(self.pending) == 1
        if first:
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class Serving:
    """Validation, generation and response building for one engine and its tokenizer."""

    def __init__(self, engine: Engine, tokenizer, name: str, request_timeout: float | None = None, observe=None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.request_timeout = request_timeout
        self.vocab = tokenizer.get_vocab_size()
        self.context = engine.max_seq_len
        self.context_text = f"this model's context of {self.context} tokens"
        self.observe = observe
        self._relay = Relay()
        """Called with (request, ttft_s, e2e_s, completion_tokens, finish) when a choice finishes (metrics)."""

    # -- validation ----------------------------------------------------------------------------------

    def parse(self, body: dict, chat: bool) -> GenerationRequest:
        """Validate a request body (OpenAI's parameters), or raise the ApiError that answers it."""
        body = {k: v for k, v in body.items() if v is not None}  # null: the parameter's default
        allowed = protocol.CHAT_FIELDS if chat else protocol.COMPLETION_FIELDS
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
        prompts = [self._encode(protocol.chat_prompt(_messages(body.get("messages"))))] if chat else self._prompts(body)
        longest = max(prompts, key=len)
        left = self.context - len(longest)
        if left < 1:
            raise ApiError(
                400, f"the prompt is {len(longest)} tokens, beyond {self.context_text} (prompt and completion "
                "together)", "prompt", "context_length_exceeded",
            )  # fmt: skip
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(name)
        if max_tokens is None:
            max_tokens = left if chat else min(protocol.DEFAULT_COMPLETION_TOKENS, left)
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}", name)
        elif max_tokens > left:
            raise ApiError(
                400, f"{name} ({max_tokens}) + the prompt ({len(longest)} tokens) exceed {self.context_text}: "
                f"{name} can be at most {left} for this prompt", name, "context_length_exceeded",
            )  # fmt: skip
        temperature = body.get("temperature", 1.0)
        if not _is_number(temperature) or temperature < 0:
            raise ApiError(400, f"temperature must be a number >= 0, got {temperature!r}", "temperature")
        top_p = body.get("top_p")
        if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
            raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63 - protocol.MAX_CHOICES):
            raise ApiError(400, f"seed must be an integer in [0, 2^63), got {seed!r}", "seed")
        n = body.get("n", 1)
        if not _is_int(n) or not 1 <= n * len(prompts) <= protocol.MAX_CHOICES:
            raise ApiError(
                400, f"n must be an integer >= 1, with at most {protocol.MAX_CHOICES} choices in all (n times the "
                f"prompts), got n={n!r}", "n",
            )  # fmt: skip
        penalties = {}
        for key in ("frequency_penalty", "presence_penalty"):
            value = body.get(key, 0.0)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ApiError(400, f"{key} must be a number in [-2, 2], got {value!r}", key)
            penalties[key] = float(value)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options may only hold include_usage", "stream_options")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, f"echo must be a boolean, got {echo!r}", "echo")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
        logprobs = self._logprobs(body, chat)
        stop = _stop_strings(body.get("stop"))
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=float(temperature), top_p=top_p, seed=seed,
            logit_bias=self._logit_bias(body.get("logit_bias")), logprobs=logprobs,
            prompt_logprobs=echo and logprobs is not None, ignore_eos=ignore_eos, **penalties,
        )  # fmt: skip
        return GenerationRequest(
            chat=chat, prompts=prompts, params=params, n=n, stop=(*stop, protocol.CHAT_STOP) if chat else stop,
            stream=stream, include_usage=bool(options.get("include_usage")), echo=echo,
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        )  # fmt: skip

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def _prompts(self, body: dict) -> list[list[int]]:
        """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
        prompt = body.get("prompt")
        message = "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, message, "prompt")
        if all(_is_int(t) for t in prompt):
            prompt = [prompt]
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append(self._encode(p))
            elif isinstance(p, list) and p and all(_is_int(t) and 0 <= t < self.vocab for t in p):
                prompts.append(list(p))
            else:
                raise ApiError(400, f"{message} (token ids in [0, {self.vocab}))", "prompt")
        return prompts

    def _logprobs(self, body: dict, chat: bool) -> int | None:
        """How many alternatives per token to return: None for no log-probs at all."""
        if not chat:
            value = body.get("logprobs")
            if value is not None and (not _is_int(value) or not 0 <= value <= protocol.MAX_LOGPROBS):
                raise ApiError(400, f"logprobs must be an integer in [0, {protocol.MAX_LOGPROBS}], got {value!r}",
                               "logprobs")  # fmt: skip
            return value
        wanted, top = body.get("logprobs", False), body.get("top_logprobs")
        if not isinstance(wanted, bool):
            raise ApiError(400, f"logprobs must be a boolean for chat, got {wanted!r}", "logprobs")
        if top is not None:
            if not _is_int(top) or not 0 <= top <= protocol.MAX_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be an integer in [0, {protocol.MAX_LOGPROBS}]", "top_logprobs")
            if not wanted:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else None

    def _logit_bias(self, bias) -> dict[int, float]:
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise ApiError(400, "logit_bias must map token ids to biases in [-100, 100]", "logit_bias")
        out = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else None
            if token is None or not 0 <= token < self.vocab or not _is_number(value) or not -100 <= value <= 100:
                raise ApiError(
                    400, f"logit_bias: {key!r}: keys must be token ids in [0, {self.vocab}) and values numbers in "
                    "[-100, 100]", "logit_bias",
                )  # fmt: skip
            out[token] = float(value)
        return out

    # -- generation ----------------------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[Delta | Finish]:
        """Submit every choice to the engine and yield their text as it is decoded, then each one's Finish.
        Raises ApiError (429 when the queue is full, 504 past the time limit, 500 if decoding failed).
        Whatever ends the iteration early (a client that left) aborts the choices still running."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[tuple[int, SequenceOutput]] = asyncio.Queue()
        choices: list[_Choice] = []
        started = time.monotonic()
        first: dict[int, float] = {}
        try:
            for i, prompt in enumerate(p for p in request.prompts for _ in range(request.n)):
                j = i % request.n
                params = request.params
                if params.seed is not None and j:
                    params = dataclasses.replace(params, seed=params.seed + j)  # n choices: n streams
                choice = _Choice(f"{request.id}-{i}", StopText(self.tokenizer, request.stop))
                choices.append(choice)

                def deliver(out: SequenceOutput, i: int = i) -> None:
                    self._relay.send(loop, outputs, (i, out))

                try:
                    self.engine.add(choice.request_id, prompt, params, deliver, self.request_timeout)
                except QueueFull:
                    choice.done = True
                    raise ApiError(
                        429, f"the server is busy: {self.engine.config.max_queue} requests are queued; retry later",
                        None, "queue_full", "rate_limit_error",
                    ) from None  # fmt: skip
                except ValueError as e:
                    choice.done = True
                    raise ApiError(400, str(e), "prompt", "context_length_exceeded") from None
            prompt_sent = set()
            checked = time.monotonic()
            while not all(c.done for c in choices):
                if disconnected is not None and time.monotonic() - checked > 0.5:  # a client that left
                    checked = time.monotonic()
                    if await disconnected():
                        return
                if disconnected is None:  # a stream: the app cancels this generator if the client leaves
                    i, out = await outputs.get()
                else:
                    try:
                        i, out = await asyncio.wait_for(outputs.get(), timeout=0.5)
                    except TimeoutError:
                        continue
                choice = choices[i]
                if choice.done:
                    continue
                if out.error is not None:
                    choice.done = True
                    if out.finish_reason == "timeout":
                        raise ApiError(504, f"the request ran past the server's time limit of {self.request_timeout} "
                                       "s", None, "request_timeout")  # fmt: skip
                    raise ApiError(500, out.error)
                if out.token_ids:
                    first.setdefault(i, time.monotonic())
                if request.echo and i not in prompt_sent:
                    prompt_sent.add(i)
                    yield self._echo(i, request.prompts[i // request.n], out, request.params.logprobs)
                delta, entries = self._push(choice, out, request.params.logprobs)
                if delta or entries:
                    yield Delta(i, delta, entries)
                if choice.text.stopped or out.finish_reason is not None:
                    if out.finish_reason is None:  # a stop string: the engine need not go on
                        self.engine.abort(choice.request_id, "stop")
                    choice.done = True
                    tail = choice.text.finish()
                    if tail:
                        yield Delta(i, tail, [])
                    reason = "length" if out.finish_reason == "length" and not choice.text.stopped else "stop"
                    if self.observe is not None:
                        ttft = first.get(i, time.monotonic()) - started
                        self.observe(request, ttft, time.monotonic() - started, choice.tokens, reason)
                    yield Finish(i, reason, len(request.prompts[i // request.n]), choice.tokens, out.cached_tokens)
        finally:
            for c in choices:
                if not c.done:
                    self.engine.abort(c.request_id)

    def _push(self, choice: _Choice, out: SequenceOutput, logprobs: int | None):
        """Feed a choice's new tokens to its StopText: the text released and the tokens' log-probs."""
        pieces, entries = [], []
        for k, token in enumerate(out.token_ids):
            choice.tokens += 1
            pieces.append(choice.text.push(token))
            if logprobs is not None and out.logprobs is not None:
                entries.append(self._entry(token, *out.logprobs[k]))
            if choice.text.stopped:
                break
        return "".join(pieces), entries

    def _echo(self, index: int, prompt: list[int], out: SequenceOutput, logprobs: int | None) -> Delta:
        entries = []
        if logprobs is not None and out.prompt_logprobs is not None:
            entries = [self._entry(*e) for e in zip(prompt, out.prompt_logprobs, out.prompt_top_logprobs)]
        return Delta(index, self.tokenizer.decode(prompt), entries)

    def _entry(self, token: int, logprob: float | None, top: list[tuple[int, float]]):
        """A token's log-prob entry as text: (token, log-prob, [(alternative, log-prob)])."""
        return self.tokenizer.decode([token]), logprob, [(self.tokenizer.decode([t]), v) for t, v in top]


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= protocol.MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            400, f"stop must be a non-empty string or a list of 1 to {protocol.MAX_STOP_STRINGS} of them", "stop"
        )
    return tuple(stops)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ApiError(400, f"messages[{i}] must have exactly the keys role and content", f"messages[{i}]")
        if m["role"] not in protocol.CHAT_ROLES or not isinstance(m["content"], str):
            raise ApiError(
                400, f"messages[{i}]: role must be one of {protocol.CHAT_ROLES} and content a string", f"messages[{i}]"
            )
    return messages
