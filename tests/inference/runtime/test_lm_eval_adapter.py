"""The lm-evaluation-harness adapter on the tiny package: its scores against log-softmax of the target's
own logits, its generation against the target's greedy decoding, and lm_eval's CLI end to end on the
tiny local tasks in lm_eval_tasks/ (offline)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from inference.runtime.generate import SamplingConfig
from inference.runtime.lm_eval_adapter import FrugalLM

ROOT = Path(__file__).resolve().parents[3]
TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def lm(tiny_package):
    return FrugalLM(package=str(tiny_package), batch_size=3)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def logprobs(lm: FrugalLM, inputs: list[int]) -> torch.Tensor:
    """log-softmax of the target's logits over one unpadded sequence, through its KV cache as served."""
    model = lm.target.model
    with torch.no_grad():
        return model(torch.tensor([inputs]), 0, model.new_cache(1, len(inputs)))[0].float().log_softmax(-1)


def reference_loglikelihood(lm: FrugalLM, context: str, continuation: str) -> tuple[float, bool]:
    """lm_eval's tokenization (the context's trailing spaces start the continuation; an empty context is
    <|eos|>), then log-softmax over the last max_length + 1 tokens."""
    tok = lm.tokenizer
    context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
    context_ids = tok.encode(context).ids if context else [lm.eot_token_id]
    whole = tok.encode(context + continuation).ids if context else context_ids + tok.encode(continuation).ids
    continuation_ids = whole[len(context_ids) :]
    tokens = whole[-(lm.max_length + 1) :]
    lp = logprobs(lm, tokens[:-1])[-len(continuation_ids) :]
    picked = lp[torch.arange(len(continuation_ids)), continuation_ids]
    return float(picked.sum()), lp.argmax(-1).tolist() == continuation_ids


def test_loglikelihood_is_the_targets_log_softmax(lm):
    context = "The river flows"
    first = lm.tokenizer.encode(context).ids
    greedy = [int(logprobs(lm, first)[-1].argmax())]
    greedy.append(int(logprobs(lm, first + greedy)[-1].argmax()))
    greedy_text = lm.tokenizer.decode(greedy)
    assert lm.tokenizer.encode(context + greedy_text).ids == first + greedy  # the pair tokenizes back
    pairs = [
        ("The river", " flows to the sea"),
        ("", "hello world"),
        ("a b c ", "d e"),  # the trailing space moves to the continuation
        ("word " * 80, "end"),  # longer than the context: cut from the left
        (context, greedy_text),
    ]
    got = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    for (logprob, is_greedy), pair in zip(got, pairs):
        want_logprob, want_greedy = reference_loglikelihood(lm, *pair)
        assert logprob == pytest.approx(want_logprob, abs=1e-4), pair
        assert is_greedy == want_greedy, pair
    assert got[-1][1]


def test_loglikelihood_rolling_predicts_every_token_once(lm):
    short = "the sea is calm"
    ids = lm.tokenizer.encode(short).ids
    lp = logprobs(lm, [lm.eot_token_id, *ids[:-1]])
    want_short = float(lp[torch.arange(len(ids)), ids].sum())

    long = "the river flows to the sea and the sea is wide " * 2
    ids = lm.tokenizer.encode(long).ids
    n = lm.max_length
    assert n < len(ids) <= 2 * n
    # window 1: <|eos|> + the first n - 1 tokens predict the first n; window 2: the n tokens before each of
    # the rest predict it, from one full-context pass over tokens len - n - 1 .. len - 2
    lp1 = logprobs(lm, [lm.eot_token_id, *ids[: n - 1]])
    lp2 = logprobs(lm, ids[-n - 1 : -1])[-(len(ids) - n) :]
    want_long = float(lp1[torch.arange(n), ids[:n]].sum() + lp2[torch.arange(len(ids) - n), ids[n:]].sum())

    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)])
    assert got == pytest.approx([want_short, want_long], abs=1e-3)


def test_generate_until_is_the_targets_greedy_decoding_cut_at_the_stop_string(lm, tiny_package):
    plain = FrugalLM(package=str(tiny_package), speculative=False)
    assert lm.speculative and not plain.speculative
    for context in ("The river", "Once upon a time", "1 2 3 4"):
        ids = lm.target.generate_ids(lm.tokenizer.encode(context).ids, SamplingConfig(max_new_tokens=12))
        want = lm.tokenizer.decode(ids)
        args = (context, {"until": ["\n\n"], "max_gen_toks": 12})
        assert lm.generate_until([request("generate_until", *args)]) == [want]
        assert plain.generate_until([request("generate_until", *args)]) == [want]

    # the untrained model repeats its last token when greedy; sampled text has stop strings inside it
    sampled = {"do_sample": True, "max_gen_toks": 30, "until": []}
    torch.manual_seed(0)
    [text] = lm.generate_until([request("generate_until", "The river", sampled)])
    stop = next(text[i : i + 2] for i in range(4, len(text)) if text[i : i + 2].isascii())
    torch.manual_seed(0)
    [cut] = lm.generate_until([request("generate_until", "The river", {**sampled, "until": [stop]})])
    assert cut == text.split(stop)[0] and len(cut) < len(text)

    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([request("generate_until", "The river", {"num_beams": 2})])


def test_frugal_is_declared_as_an_lm_eval_model():
    [entry] = entry_points(group="lm_eval.models", name="frugal")
    assert entry.value == "inference.runtime.lm_eval_adapter:FrugalLM"
    assert entry.load() is FrugalLM


@pytest.mark.slow
def test_lm_eval_cli_runs_the_local_tasks_offline(tiny_package, tmp_path):
    tasks = ["frugal_tiny_mc", "frugal_tiny_gen"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [
        *(sys.executable, "-m", "inference.runtime.lm_eval_adapter", "--model", "frugal"),
        *("--model_args", f"package={tiny_package}", "--tasks", ",".join(tasks)),
        *("--include_path", str(TASKS), "--limit", "6", "--batch_size", "4", "--device", "cpu"),
        *("--output_path", str(tmp_path / "out")),
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
    [path] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["config"]["frugal_package"] == "frugal-tiny" and results["config"]["speculative"]
    acc = results["results"]["frugal_tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and results["results"]["frugal_tiny_mc"]["sample_len"] == 6

    in_process = simple_evaluate(
        model=FrugalLM(package=str(tiny_package), batch_size=4),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        limit=6,
    )
    for task, metric in (("frugal_tiny_mc", "acc,none"), ("frugal_tiny_gen", "exact_match,none")):
        assert in_process["results"][task][metric] == results["results"][task][metric]


@pytest.mark.slow
def test_lm_eval_local_completions_against_frugal_serve_matches_the_adapter(tiny_package, tmp_path):
    """A client written elsewhere: lm_eval's own `local-completions` model (OpenAI completions with echo and
    logprobs for loglikelihood, vLLM's /tokenize for the remote tokenizer) against a frugal-serve process
    gives, sample by sample, the in-process adapter's log-likelihoods and generations."""
    from tests.inference.runtime.test_serve import running_server

    tasks = ["frugal_tiny_mc", "frugal_tiny_gen"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with running_server(tiny_package, log=tmp_path / "server.log") as (port, _, _):
        model_args = (
            f"base_url=http://127.0.0.1:{port}/v1/completions,model=frugal-tiny,tokenizer_backend=remote,"
            "tokenized_requests=True,max_length=64,num_concurrent=4,max_retries=1"
        )
        cmd = [
            *(sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args),
            *("--tasks", ",".join(tasks), "--include_path", str(TASKS), "--limit", "6", "--log_samples"),
            *("--output_path", str(tmp_path / "out")),
        ]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    served = {}
    for task in tasks:
        [path] = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        served[task] = [json.loads(line) for line in path.read_text().splitlines()]
    in_process = simple_evaluate(
        model=FrugalLM(package=str(tiny_package), batch_size=4, speculative=False),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        limit=6,
        log_samples=True,
    )
    for task in tasks:
        mine = {s["doc_id"]: s for s in in_process["samples"][task]}
        assert len(served[task]) == len(mine) == (6 if task == "frugal_tiny_mc" else 4)
        for sample in served[task]:
            want = mine[sample["doc_id"]]["resps"]
            if task == "frugal_tiny_mc":  # per choice: (log-likelihood, is_greedy), logged as strings
                got = [r[0] for r in sample["resps"]]
                assert [g[1] for g in got] == [str(w[0][1]) for w in want]
                assert [float(g[0]) for g in got] == pytest.approx([w[0][0] for w in want], abs=2e-3)
            else:
                assert sample["resps"] == want, sample["doc_id"]
