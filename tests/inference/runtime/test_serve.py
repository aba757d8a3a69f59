"""The OpenAI-compatible server: real `python -m inference.runtime.serve` processes on the tiny packages, driven by
the official openai client (completions, chat, streaming, seeds, stop strings, n, log-probs, concurrent
clients) and by raw HTTP for every kind of bad request, the API key, disconnects and time limits."""

import contextlib
import http.client
import json
import math
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import psutil
import pytest
import torch
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from inference.runtime.generate import SamplingConfig
from inference.runtime.package import load_package
from inference.runtime.server import app as server_app
from inference.runtime.server import protocol
from inference.runtime.server.serving import StopText

ROOT = Path(__file__).resolve().parents[3]
NAME = "frugal-tiny"
PROMPT = "The function returns"


@pytest.fixture(scope="module")
def package(tiny_package):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (and on the server)
    yield load_package(tiny_package)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_server(package_dir: Path, *args: str, env: dict | None = None, log: Path | None = None):
    """A server process on a free port of 127.0.0.1: (port, process, log path); stopped on exit."""
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"frugal-serve-{os.getpid()}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "inference.runtime.serve", "--package", str(package_dir)]
    cmd += ["--port", "0", "--threads", "1"]
    if "--compile-sizes" not in args:
        cmd.append("--no-compile")  # the compiled step: runtime/engine/test_compiled.py, and one test here
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})}
        )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 300)
        line = server.stdout.readline() if ready else ""
        assert line.startswith("serving "), f"no ready line ({line!r}): {log.read_text()}"
        yield int(line.rsplit(":", 1)[1]), server, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def server(tiny_package, tmp_path_factory):
    with running_server(tiny_package, log=tmp_path_factory.mktemp("serve") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def port(server):
    return server[0]


@pytest.fixture(scope="module")
def client(port):
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def call(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """A raw HTTP request; the status and the JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={**({"Content-Type": "application/json"} if data else {}),
                                                   **(headers or {})})  # fmt: skip
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def metrics(port: int, headers: dict | None = None) -> dict[str, float]:
    """Every Prometheus sample of /metrics, by name and labels."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers=headers or {})
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def greedy_text(package, prompt: str, max_tokens: int) -> tuple[str, int]:
    tok = package.target.tokenizer
    ids = package.target.generate_ids(tok.encode(prompt).ids, SamplingConfig(max_new_tokens=max_tokens))
    return tok.decode(ids), len(ids)


def test_models_lists_the_package(client, port):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    status, body = call(port, "GET", "/v1/models/other")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_greedy_completion_is_the_targets_own_decoding(client, package):
    """Batched speculative decoding is lossless: the served greedy text is the target's plain greedy decoding."""
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    text, n = greedy_text(package, PROMPT, 12)
    assert n == 12  # the untrained model never emits eos: max_tokens ends it
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    prompt_tokens = len(package.target.tokenizer.encode(PROMPT).ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12,
    )  # fmt: skip


def test_streamed_completion_equals_the_greedy_text(client, package):
    chunks = list(
        client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1  # it did stream
    assert "".join(texts) == greedy_text(package, PROMPT, 12)[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_plain_and_streamed(client, package):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ka lo mi"}]
    prompt = protocol.chat_prompt(messages)
    assert prompt == "System: Be brief.\nUser: ka lo mi\nAssistant:"
    expected = greedy_text(package, prompt, 10)[0].split(protocol.CHAT_STOP)[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(package.target.tokenizer.encode(prompt).ids)
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_a_seed_repeats_sampled_output(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text


def test_n_choices_are_independent_samples_and_seeded_n_repeats(client, package):
    kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 11}
    out, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert out.usage.completion_tokens == 36
    assert out.usage.prompt_tokens == len(package.target.tokenizer.encode(PROMPT).ids)  # once, not per choice


def test_stop_strings_cut_the_text(client):
    kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": 7}
    full = client.completions.create(**kwargs).choices[0].text
    pairs = [f"{a} {b}" for a, b in pairwise(full.split()[1:])]  # two words: the stop string spans tokens
    stop = next(p for p in pairs if p.isascii() and p.replace(" ", "").isalpha() and p in full)
    expected = full[: full.index(stop)]
    out = client.completions.create(**kwargs, stop=["@@@@", stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 24
    deltas = [c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True)]
    assert "".join(deltas) == expected  # nothing past the stop string was ever sent


def test_logprobs_are_the_models_own(client, package):
    """Completions' logprobs and echo give log_softmax of the target's logits at every position."""
    tok = package.target.tokenizer
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    ids = tok.encode(PROMPT).ids
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith(PROMPT) and len(lp.token_logprobs) == len(ids) + 3
    generated = package.target.generate_ids(ids, SamplingConfig(max_new_tokens=3))
    with torch.no_grad():
        all_ids = ids + generated
        ref = package.target.model(torch.tensor([all_ids]))[0].float().log_softmax(-1)
    expected = [None] + [ref[i - 1, t].item() for i, t in enumerate(all_ids) if i > 0]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=2e-3)
    for top, chosen in zip(lp.top_logprobs[len(ids) :], lp.token_logprobs[len(ids) :]):
        assert max(top.values()) == pytest.approx(chosen)  # greedy: the chosen token is the most likely
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_logit_bias_and_penalties_steer_the_choice(client, package):
    tok = package.target.tokenizer
    base = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    first = tok.encode(PROMPT + base.choices[0].text).ids[len(tok.encode(PROMPT).ids)]
    banned = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(first): -100}
    )
    assert first not in tok.encode(banned.choices[0].text).ids
    forced = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"300": 100})
    assert forced.choices[0].text == tok.decode([300] * 4)
    repeats = base.choices[0].text  # the untrained model repeats itself; a frequency penalty stops that
    penalized = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                          frequency_penalty=2.0)  # fmt: skip
    ids = tok.encode(penalized.choices[0].text).ids
    assert len(set(tok.encode(repeats).ids)) < len(set(ids))


def test_prompts_as_token_ids_and_batches(client, package):
    ids = package.target.tokenizer.encode(PROMPT).ids
    as_text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    as_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
    batch = client.completions.create(model=NAME, prompt=[ids, "Data is"], max_tokens=5, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        as_text.choices[0].text, greedy_text(package, "Data is", 5)[0],
    ]  # fmt: skip


def test_a_shared_prefix_is_served_from_the_cache(client, port, package):
    """The second request with the same long prompt reuses its blocks and says so in usage."""
    prompt = "In a quiet village, the keeper told stories."  # 41 tokens: two full blocks of 16
    n_prompt = len(package.target.tokenizer.encode(prompt).ids)
    cold = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    warm = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == (n_prompt - 1) // 16 * 16 > 0
    assert warm.choices[0].text == cold.choices[0].text
    m = metrics(port)
    assert m["frugal_prefix_cache_hits_total"] >= warm.usage.prompt_tokens_details.cached_tokens


BAD_REQUESTS = {
    "invalid JSON": ("POST", "/v1/completions", b'{"model": "frugal-tiny", "prompt": ', 400, None, "invalid_json"),
    "not an object": ("POST", "/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    "unknown field": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "frobnicate": 1}, 400, "frobnicate",
                      "unknown_parameter"),
    "max_tokens past the context": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 1000},
                                    400, "max_tokens", "context_length_exceeded"),
    "max_tokens zero": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400,
                        "max_tokens", None),
    "negative temperature": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "temperature": -0.5}, 400,
                             "temperature", None),
    "top_p zero": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p", None),
    "top_p above one": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "top_p": 1.5}, 400, "top_p", None),
    "huge prompt": ("POST", "/v1/completions", {"model": NAME, "prompt": "lorem ipsum " * 20_000}, 400, "prompt",
                    "context_length_exceeded"),
    "empty prompt": ("POST", "/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt", None),
    "token id past the vocabulary": ("POST", "/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt",
                                     None),
    "too many choices": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "n": 100}, 400, "n", None),
    "penalty out of range": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "presence_penalty": 3}, 400,
                             "presence_penalty", None),
    "bad logit_bias": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"x": 1}}, 400,
                       "logit_bias", None),
    "too many logprobs": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 50}, 400, "logprobs",
                          None),
    "top_logprobs without logprobs": ("POST", "/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", None),
    "bad stop": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "stop": ["a", 3]}, 400, "stop", None),
    "bad message": ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
                    400, "messages[0]", None),
    "no messages": ("POST", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", None),
    "unknown model": ("POST", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model", "model_not_found"),
    "unknown path": ("POST", "/v1/embeddings", {"model": NAME, "input": "a"}, 404, None, "not_found"),
    "unknown GET path": ("GET", "/v2/models", None, 404, None, "not_found"),
    "wrong method": ("GET", "/v1/completions", None, 405, None, "method_not_allowed"),
    "wrong method on GET path": ("DELETE", "/health", None, 405, None, "method_not_allowed"),
    "body over the limit": ("POST", "/v1/completions", b" " * (2 * protocol.MAX_BODY_BYTES), 413, None,
                            "body_too_large"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(port, case):
    method, path, body, status, param, code = BAD_REQUESTS[case]
    got, payload = call(port, method, path, body)
    assert got == status, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]
    assert (payload["error"]["param"], payload["error"]["code"]) == (param, code)
    if param not in (None, "model"):
        assert param.split("[")[0] in payload["error"]["message"]
    status, health = call(port, "GET", "/health")
    assert status == 200 and (health["status"], health["model"], health["running"], health["waiting"]) == (
        "ok", NAME, 0, 0,
    )  # fmt: skip


def test_the_context_error_states_the_limits(port, package):
    _, payload = call(port, "POST", "/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 1000})
    prompt_tokens = len(package.target.tokenizer.encode(PROMPT).ids)
    assert payload["error"]["message"] == (
        f"max_tokens (1000) + the prompt ({prompt_tokens} tokens) exceed this model's context of 64 tokens: "
        f"max_tokens can be at most {64 - prompt_tokens} for this prompt"
    )


def test_metrics_count_tokens_batches_and_acceptance(client, port):
    before = metrics(port)
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    call(port, "POST", "/v1/completions", b"not json")
    after = metrics(port)
    assert after["frugal_generation_tokens_total"] - before["frugal_generation_tokens_total"] == 10
    assert after["frugal_requests_total{finish_reason=length}"] - before.get(
        "frugal_requests_total{finish_reason=length}", 0) == 1  # fmt: skip
    assert after["frugal_http_errors_total{status=400}"] - before.get("frugal_http_errors_total{status=400}", 0) == 1
    proposed = after["frugal_spec_decode_num_draft_tokens_total"] - before["frugal_spec_decode_num_draft_tokens_total"]
    accepted = after["frugal_spec_decode_num_accepted_tokens_total"]
    rounds = {
        kind: after[f"frugal_spec_decode_rounds_total{{kind={kind}}}"]
        - before.get(f"frugal_spec_decode_rounds_total{{kind={kind}}}", 0)
        for kind in ("speculative", "plain")
    }
    # adaptive gamma drafts (each speculative round proposes at least one token) or chooses plain rounds, and
    # counts which
    assert rounds["speculative"] + rounds["plain"] >= 1, rounds
    assert proposed >= rounds["speculative"] and (proposed == 0) == (rounds["speculative"] == 0), (proposed, rounds)
    assert 0 <= accepted <= after["frugal_spec_decode_num_draft_tokens_total"]
    assert after["frugal_time_to_first_token_seconds_count"] > before.get("frugal_time_to_first_token_seconds_count", 0)
    assert after["frugal_num_requests_running"] == 0 and after["frugal_kv_cache_blocks{state=used}"] == 0


def test_sixty_four_clients_with_bad_requests_mixed_in(client, port, server, package):
    """48 good greedy requests and 16 bad ones at once, twice: every good one gets its exact text, every bad one
    its 4xx, the server stays up, all blocks come back, and its memory stays flat."""
    prompts = ["Once upon a time", "Data is", "Hello there", "ka lo mi", "The cat sat", "A note", "In sum", "We found"]
    expected = {p: greedy_text(package, p, 16)[0] for p in prompts}
    bad = [BAD_REQUESTS[k] for k in ("invalid JSON", "unknown field", "huge prompt", "bad logit_bias")]
    process = psutil.Process(server[1].pid)

    def round_of_64() -> None:
        barrier, results = threading.Barrier(64), {}

        def good(i: int) -> None:
            barrier.wait()
            out = client.completions.create(model=NAME, prompt=prompts[i % 8], max_tokens=16, temperature=0)
            results[i] = out.choices[0].text == expected[prompts[i % 8]]

        def wrong(i: int) -> None:
            method, path, body, status, _, _ = bad[i % 4]
            barrier.wait()
            results[i] = call(port, method, path, body)[0] == status

        threads = [threading.Thread(target=wrong if i % 4 == 3 else good, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 64 and all(results.values()), [i for i, ok in results.items() if not ok]

    def rss() -> int:  # the server and its engine process (and multiprocessing's resource tracker)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])

    round_of_64()
    before = rss()
    for _ in range(2):
        round_of_64()
    assert rss() - before < 32 * 2**20  # flat: no per-request leak
    health = call(port, "GET", "/health")[1]
    assert health["running"] == 0 and health["waiting"] == 0 and health["kv_blocks"]["used"] == 0


def test_a_full_queue_answers_429(package):
    """In-process, with the engine's loop not running: two requests fill a queue of two, the third is refused
    with 429; once the engine steps, the two queued ones finish."""
    from fastapi.testclient import TestClient

    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.engine.sampler import SamplingParams

    engine = Engine(package.target, package.draft, EngineConfig(max_queue=2, gamma=package.gamma))
    app = server_app.build_app(engine, NAME, package.target.tokenizer)
    done = []
    ids = package.target.tokenizer.encode(PROMPT).ids
    for i in range(2):
        engine.add(f"queued-{i}", ids, SamplingParams(max_new_tokens=4), lambda out: done.append(out.finish_reason))
    response = TestClient(app).post("/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error" and response.json()["error"]["code"] == "queue_full"
    engine.run_until_done()
    assert done.count("length") == 2


def test_stop_text_releases_whole_characters_and_nothing_past_a_stop(package):
    tok = package.target.tokenizer
    text = "héllo wörld ✓ done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # the accented letters and the check mark span several byte tokens

    def run(stops: tuple[str, ...]) -> tuple[list[str], StopText]:
        decoder = StopText(tok, stops)
        deltas = []
        for token in ids:
            deltas.append(decoder.push(token))
            if decoder.stopped:
                break
        return [*deltas, decoder.finish()], decoder

    deltas, decoder = run(())
    assert "".join(deltas) == text and not decoder.stopped
    assert all("\ufffd" not in d for d in deltas)
    deltas, decoder = run(("rld ✓", "zz"))
    assert "".join(deltas) == "héllo wö" and decoder.stopped
    assert all("\ufffd" not in d for d in deltas)


def test_tokenizer_endpoints_round_trip(port, package):
    status, info = call(port, "GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|eos|>"
    status, out = call(port, "POST", "/tokenize", {"prompt": "héllo wörld", "add_special_tokens": False})
    assert out["tokens"] == package.target.tokenizer.encode("héllo wörld").ids and out["count"] == len(out["tokens"])
    assert call(port, "POST", "/detokenize", {"tokens": out["tokens"]})[1] == {"prompt": "héllo wörld"}


# -- start-up, keys, disconnects, time limits --------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--kv-blocks"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_batch_or_queue_below_one_is_refused_at_start_up(tiny_package, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        server_app.main(["--package", str(tiny_package), flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.slow
def test_the_server_compiles_its_step_at_start_up_and_says_how_long_it_took(tiny_package, package, tmp_path):
    """--compile-sizes 4 (--fast-compile: no autotuning; --no-speculative: one model to compile, to keep the test
    short): compiled before the ready line, the time logged, and the greedy text is the target's own decoding."""
    args = ("--compile-sizes", "4", "--fast-compile", "--no-speculative")
    with running_server(tiny_package, *args, log=tmp_path / "server.log") as (port, _, log):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        assert out.choices[0].text == greedy_text(package, PROMPT, 12)[0]
        assert re.search(r"compiled the decode step in [0-9.]+ s", log.read_text()), log.read_text()
    with pytest.raises(SystemExit) as exit_info:
        server_app.main(["--package", str(tiny_package), "--compile-sizes", "4,0"])
    assert exit_info.value.code == 2


def test_without_a_package_or_a_bundled_one_it_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:  # the source tree is not an installed release
        server_app.main(["--port", "0"])
    assert exit_info.value.code == 2
    assert "--package is required: " in (err := capsys.readouterr().err) and "no bundled package here" in err


def test_a_public_address_without_a_key_is_warned_about(tmp_path, capsys):
    """The warning comes before anything is loaded or bound (here the package is missing, so nothing is)."""
    with pytest.raises(SystemExit):
        server_app.main(["--host", "0.0.0.0", "--package", str(tmp_path / "none")])
    assert "without an API key" in capsys.readouterr().err
    assert server_app._loopback("127.0.0.1") and server_app._loopback("::1") and server_app._loopback("localhost")
    assert not server_app._loopback("0.0.0.0") and not server_app._loopback("10.1.2.3")


def test_an_api_key_guards_every_endpoint_but_health(tiny_package, tmp_path):
    key = "sk-frugal-test-7f3a9c"
    with running_server(tiny_package, env={"FRUGAL_API_KEY": key}, log=tmp_path / "server.log") as (port, _, log):
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 2}),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                status, payload = call(port, method, path, body, headers)
                assert status == 401, (path, headers)
                assert payload["error"]["type"] == "authentication_error"
                assert payload["error"]["code"] == "invalid_api_key"
        assert call(port, "GET", "/health")[0] == 200
        keyed = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert keyed.completions.create(model=NAME, prompt="a", max_tokens=2).usage.completion_tokens == 2
        assert "frugal_generation_tokens_total" in metrics(port, {"Authorization": f"Bearer {key}"})
    assert key not in log.read_text()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(long_package, tmp_path):
    with running_server(long_package, log=tmp_path / "server.log") as (port, _, _):
        body = json.dumps({"model": "frugal-long", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0,
                           "stream": True}).encode()  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        received = b""
        while received.count(b"data: ") < 5:
            received += sock.recv(4096)
        during = call(port, "GET", "/health")[1]
        assert during["running"] == 1 and during["kv_blocks"]["used"] > 0
        sock.close()
        deadline = time.monotonic() + 5
        while (health := call(port, "GET", "/health")[1])["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health["running"] == 0 and health["kv_blocks"]["used"] == 0
        m = metrics(port)
        assert m["frugal_generation_tokens_total"] < 2000  # it stopped: it did not decode to the end
        assert m["frugal_engine_finished_total{reason=abort}"] == 1


def test_a_request_past_its_time_limit_ends_with_504_and_frees_its_blocks(long_package, tmp_path):
    with running_server(long_package, "--request-timeout", "0.5", log=tmp_path / "server.log") as (port, _, _):
        started = time.monotonic()
        body = {"model": "frugal-long", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0}
        status, payload = call(port, "POST", "/v1/completions", body)
        assert status == 504 and payload["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 3
        health = call(port, "GET", "/health")[1]
        assert health["running"] == 0 and health["kv_blocks"]["used"] == 0
        m = metrics(port)
        assert math.isclose(m["frugal_http_errors_total{status=504}"], 1)
        assert m["frugal_engine_finished_total{reason=timeout}"] == 1


def test_the_server_imports_only_the_runtime():
    """The wheel vendors these modules: the standard library, torch, the runtime packages and the server's
    declared dependencies only."""
    allowed = {"torch", "inference", "model", "kernels", "fastapi", "starlette", "uvicorn", "prometheus_client"}
    for path in [*(ROOT / "inference" / "server").glob("*.py"), *(ROOT / "inference" / "engine").glob("*.py")]:
        lines = path.read_text().splitlines()
        imports = {line.split()[1].split(".")[0] for line in lines if line.startswith(("import ", "from "))}
        assert imports - set(sys.stdlib_module_names) <= allowed, (path, imports - set(sys.stdlib_module_names))


@pytest.mark.slow
def test_an_mtp_package_is_served_with_its_own_modules_as_the_proposer(mtp_package, tmp_path):
    """No draft in the package: the target's MTP modules propose, the served greedy text is the target's own, and
    /health and /metrics say so; --proposer none turns speculation off."""
    mtp = load_package(mtp_package)
    text, _ = greedy_text(mtp, PROMPT, 12)
    with running_server(mtp_package, "--max-batch", "4", log=tmp_path / "server.log") as (port, _, _):
        assert call(port, "GET", "/health")[1]["proposer"] == "mtp"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        outs = [client.completions.create(model="frugal-mtp", prompt=PROMPT, max_tokens=12, temperature=0)
                for _ in range(3)]  # fmt: skip
        assert {o.choices[0].text for o in outs} == {text}
        assert metrics(port)["frugal_spec_decode_num_draft_tokens_total"] > 0
    with running_server(mtp_package, "--proposer", "none", log=tmp_path / "plain.log") as (port, _, _):
        assert call(port, "GET", "/health")[1]["proposer"] == "none"
