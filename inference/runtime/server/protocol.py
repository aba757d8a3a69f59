"""The OpenAI wire format as frugal-serve speaks it: errors, the fields each endpoint accepts, and the
objects it answers with (completions, chat completions, their stream chunks, usage, log-probs)."""

from __future__ import annotations

MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions (chat defaults to what the context leaves)."""
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
"""The largest n (and prompts per request times n)."""
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = "\nUser:"
"""Where the chat template's next user turn would begin: an implicit stop string for chat."""

COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "user", "ignore_eos",
}  # fmt: skip
"""OpenAI's parameters, and vLLM's ignore_eos (benchmarks use it to generate exactly max_tokens)."""
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


class ApiError(Exception):
    """An error answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}."""

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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(tokens: list[str], logprobs: list[float | None], tops: list[dict], offset: int = 0) -> dict:
    """The legacy completions format: parallel lists, with each token's offset in the returned text."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    """The chat format: per token its text, log-prob, UTF-8 bytes and the top alternatives."""

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}
