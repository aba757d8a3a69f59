"""The OpenAI-compatible server: a real `python -m inference.serve` process on the tiny package, driven by the
official openai client (completions, chat, streaming, seeds, stop strings, concurrent clients) and by raw
HTTP for every kind of bad request; the queue limit and the incremental decoder are tested in-process."""

import http.client
import json
import select
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from inference import serve
from inference.generate import SamplingConfig
from inference.package import load_package

ROOT = Path(__file__).resolve().parents[2]
NAME = "frugal-tiny"
PROMPT = "The function returns"


@pytest.fixture(scope="module")
def package(tiny_package):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (and on the server)
    yield load_package(tiny_package)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def port(tiny_package, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "inference.serve", "--package", str(tiny_package), "--port", "0", "--threads", "1"]
    with open(log, "w") as stderr:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 60)
        line = server.stdout.readline() if ready else ""
        assert line.startswith(f"serving {NAME} on http://127.0.0.1:"), f"no ready line ({line!r}): {log.read_text()}"
        yield int(line.rsplit(":", 1)[1])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def client(port):
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def call(port: int, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """A raw HTTP request; the status and the JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


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
    """Speculative decoding is lossless: the served greedy text is the target's plain greedy decoding."""
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
    prompt = serve.chat_prompt(messages)
    assert prompt == "System: Be brief.\nUser: ka lo mi\nAssistant:"
    expected = greedy_text(package, prompt, 10)[0].split(serve.CHAT_STOP)[0]
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
    "two choices": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "n": 2, "seed": None}, 400, "n", None),
    "bad stop": ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "stop": ["a", 3]}, 400, "stop", None),
    "bad message": ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
                    400, "messages[0]", None),
    "no messages": ("POST", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", None),
    "unknown model": ("POST", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model", "model_not_found"),
    "unknown path": ("POST", "/v1/embeddings", {"model": NAME, "input": "a"}, 404, None, "not_found"),
    "unknown GET path": ("GET", "/v2/models", None, 404, None, "not_found"),
    "wrong method": ("GET", "/v1/completions", None, 405, None, "method_not_allowed"),
    "wrong method on GET path": ("DELETE", "/health", None, 405, None, "method_not_allowed"),
    "body over the limit": ("POST", "/v1/completions", b" " * (2 * serve.MAX_BODY_BYTES), 413, None,
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
    assert call(port, "GET", "/health") == (200, {
        "status": "ok", "model": NAME, "queue_depth": 0, "running": 0, "max_queue": 64,
    })  # fmt: skip


def test_the_context_error_states_the_limits(port, package):
    _, payload = call(port, "POST", "/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 1000})
    prompt_tokens = len(package.target.tokenizer.encode(PROMPT).ids)
    context = 64 - package.gamma  # the verification pass needs gamma positions past the last token
    assert payload["error"]["message"] == (
        f"max_tokens (1000) + the prompt ({prompt_tokens} tokens) exceed this model's context of {context} tokens "
        f"(max_seq_len 64 less gamma 3 for speculative decoding): max_tokens can be at most {context - prompt_tokens} "
        "for this prompt"
    )


def test_eight_concurrent_clients_all_succeed(client, package):
    prompts = ["Once upon a time", "Data is", "Hello there", "ka lo mi", "The cat sat", "A note", "In sum", "We found"]
    barrier, results = threading.Barrier(len(prompts)), {}

    def ask(prompt: str) -> None:
        barrier.wait()
        results[prompt] = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == set(prompts)
    for prompt in prompts:
        assert results[prompt].choices[0].text == greedy_text(package, prompt, 8)[0]


def test_metrics_count_tokens_and_report_acceptance(client, port):
    _, before = call(port, "GET", "/metrics")
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    call(port, "POST", "/v1/completions", b"not json")
    _, after = call(port, "GET", "/metrics")
    assert after["model"] == NAME
    assert after["requests"] - before["requests"] == 1
    assert after["completion_tokens"] - before["completion_tokens"] == 10
    assert after["errors"] - before["errors"] == 1
    assert after["busy_seconds"] > before["busy_seconds"] and after["tokens_per_second"] > 0
    spec = after["speculative"]
    assert spec["enabled"] and spec["gamma"] == 3 and spec["proposed"] - before["speculative"]["proposed"] >= 3
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted"] / spec["proposed"])
    assert 1 <= spec["mean_accepted_length"] <= 4
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics?format=prometheus")
    lines = conn.getresponse().read().decode().splitlines()
    conn.close()
    values = dict(line.split() for line in lines if not line.startswith("#"))
    assert int(values["frugal_generated_tokens_total"]) >= after["completion_tokens"]
    assert float(values["frugal_speculative_acceptance_rate"]) == pytest.approx(spec["acceptance_rate"], abs=0.2)


def test_a_full_queue_answers_429(package):
    """In-process, with the worker not yet started: two requests fill a queue of two, the third is refused;
    once the worker runs, the two queued ones are answered."""
    engine = serve.Engine(package, max_queue=2)
    server = serve.Server(("127.0.0.1", 0), engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    statuses = []

    def ask() -> None:
        statuses.append(call(port, "POST", "/v1/completions", body)[0])

    waiting = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while engine.jobs.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, payload = call(port, "POST", "/v1/completions", body)
        assert status == 429
        assert payload["error"]["type"] == "rate_limit_error" and payload["error"]["code"] == "queue_full"
        assert call(port, "GET", "/health")[1]["queue_depth"] == 2
        engine.start()
        for t in waiting:
            t.join(timeout=30)
        assert statuses == [200, 200]
        assert engine.metrics_json()["errors_by_status"] == {"429": 1}
    finally:
        server.shutdown()
        server.server_close()


def test_stop_text_releases_whole_characters_and_nothing_past_a_stop(package):
    tok = package.target.tokenizer
    text = "héllo wörld ✓ done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # the accented letters and the check mark span several byte tokens

    def run(stops: tuple[str, ...]) -> tuple[list[str], serve.StopText]:
        decoder = serve.StopText(tok, stops)
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


def test_without_a_package_or_a_bundled_one_it_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:  # the source tree is not an installed release
        serve.main(["--port", "0"])
    assert exit_info.value.code == 2
    assert "--package is required: " in (err := capsys.readouterr().err) and "no bundled package here" in err


def test_the_module_only_imports_the_runtime():
    """The wheel vendors this module: it may import the standard library, torch and the runtime packages only."""
    source = (ROOT / "inference" / "serve.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    stdlib = set(sys.stdlib_module_names)
    assert imports - stdlib <= {"torch", "inference"}, imports - stdlib
