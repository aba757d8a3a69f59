"""The cost waterfall (inference.cost): its workload, each engine measured in its own process on the same requests,
the arithmetic from seconds to $, and the headline ratios with their noise."""

import shutil

import pytest
import torch

from inference.cost import CostWorkload, Row, costs, headline, markdown, run_rows, table, waterfall_chart
from model.config import debug_tiny, dense_baseline
from model.io import save_model
from model.transformer import Transformer


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("dense-run")
    torch.manual_seed(0)
    model = Transformer(dense_baseline(debug_tiny()))
    save_model(model.state_dict(), model.config, d)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d


def workload(**kw) -> CostWorkload:
    torch.manual_seed(1)
    rows = torch.randint(3, 500, (6, 33))
    args = {"system_tokens": 20, "prompt_tokens": 4, "requests": 3, "new_tokens": 5, "repeats": 2, "gamma": 3,
            "threads": 1} | kw  # fmt: skip
    return CostWorkload.build(rows, **args)


def test_every_pass_shares_the_system_prompt_and_no_user_prompt():
    w = workload()
    passes = w.passes()
    assert len(passes) == 1 + 2 * w.repeats and all(len(p) == w.requests for p in passes)
    requests = [r for p in passes for r in p]
    assert all(r[:20] == w.system for r in requests)
    assert len({tuple(r[20:]) for r in requests}) == len(requests)  # the prefix cache can reuse the system prompt only
    assert w.max_tokens_per_request == 20 + 4 + 5
    with pytest.raises(ValueError, match="hold no prompt of 40 tokens"):
        CostWorkload.build(torch.ones(2, 33, dtype=torch.long), 0, 40, 1, 1, 1, 1, 1)


@pytest.mark.slow
def test_each_engine_serves_the_workload_in_its_own_process(dense_run, tmp_path):
    w = workload()
    run = str(dense_run)
    rows = [
        Row("transformers", "", "transformers", run, "dense"),
        Row("eager", "", "frugal", run, "dense"),
        Row("batched", "", "frugal", run, "dense", concurrency=2),
        Row("cached", "", "frugal", run, "dense", concurrency=2, prefix_caching=True),
    ]
    results = run_rows(rows, w, tmp_path, log=print)
    for r in results:
        for rep in r["repeats"]:
            assert rep["decode"]["output_tokens"] == w.requests * w.new_tokens
            assert rep["prefill"]["output_tokens"] == w.requests  # one token each: the input's cost
            assert rep["decode"]["tpot_p95_ms"] >= rep["decode"]["tpot_p50_ms"] > 0
    by = {r["row"]["label"]: r for r in results}
    # one model, one quality: transformers' logits and Frugal's cached forward agree
    assert by["transformers"]["perplexity"] == pytest.approx(by["eager"]["perplexity"], rel=1e-4)
    cached = [rep["prefill"]["cached_tokens"] for rep in by["cached"]["repeats"]]
    assert cached == [w.requests * 16] * w.repeats  # the system prompt's one whole 16-position block, every request
    assert all(rep["prefill"]["cached_tokens"] == 0 for rep in by["batched"]["repeats"])
    rows_out = table(results, price_per_hour=3.6)
    assert rows_out[0]["factor_vs_row1"] == 1.0
    assert rows_out[2]["factor_vs_previous"] == pytest.approx(
        rows_out[1]["output_usd_per_1m"] / rows_out[2]["output_usd_per_1m"]
    )
    assert rows_out[3]["cached_share"] > 0 == rows_out[2]["cached_share"]
    assert "| 4 | cached |" in markdown(rows_out)
    assert waterfall_chart(rows_out, tmp_path / "w.png", "test").read_bytes()[:4] == b"\x89PNG"


def test_llama_cpp_serves_the_same_workload_with_parallel_slots(dense_run, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make llama-cpp`")
    from inference.gguf_export import write_gguf
    from model.io import load_model

    gguf = write_gguf(load_model(dense_run), tiny_tokenizer, tmp_path / "dense.gguf")
    w = workload()
    rows = [Row("eager", "", "frugal", str(dense_run), "dense"),
            Row("llama.cpp 2 slots", "", "llama.cpp", str(gguf), "dense", concurrency=2, peer=True)]  # fmt: skip
    frugal, llama = run_rows(rows, w, tmp_path, log=print)
    assert llama["perplexity"] == pytest.approx(frugal["perplexity"], rel=1e-3)
    for rep in llama["repeats"]:
        assert rep["decode"]["output_tokens"] == w.requests * w.new_tokens
        assert rep["prefill"]["cached_tokens"] >= 20  # a slot reuses the system prompt (llama-server's cache_prompt)
    out = table([frugal, llama], 1.0)
    assert "factor_vs_previous" not in out[1] and out[1]["factor_vs_row1"] > 0


def synthetic(label: str, seconds: list[float], ppl: float, peer: bool = False, quality_of: str = "dense") -> dict:
    """A row served 1,000 output tokens in each decode pass and 500 input tokens (100 cached) per prefill pass."""
    repeats = [{"prefill": {"seconds": 1.0, "input_tokens": 500, "cached_tokens": 100, "output_tokens": 10},
                "decode": {"seconds": 1.0 + s, "output_tokens": 1000, "tpot_p50_ms": 1.0, "tpot_p95_ms": 2.0,
                           "ttft_p50_ms": 3.0}} for s in seconds]  # fmt: skip
    row = Row(label, "", "llama.cpp" if peer else "frugal", "", quality_of, peer=peer)
    return {"row": row.__dict__, "repeats": repeats, "perplexity": ppl, "compile_s": None}


def test_seconds_become_dollars_per_million_tokens():
    c = costs(synthetic("a", [3.6, 3.6, 7.2], 10), price_per_hour=1.0)
    # decode pass minus prefill pass: 3.6 s for 1,000 tokens at $1/hour = $1 per 1M
    assert c["output_usd_per_1m"] == pytest.approx(1.0) and c["output_usd_per_1m_repeats"][2] == pytest.approx(2.0)
    assert c["output_usd_spread"] == pytest.approx(1.0)
    assert c["input_usd_per_1m"] == pytest.approx(1 / 3600 / 500 * 1e6)
    assert c["uncached_input_usd_per_1m"] == pytest.approx(1 / 3600 / 400 * 1e6) and c["cached_share"] == 0.2


def test_the_headline_takes_the_cheapest_row_of_equal_quality_and_its_noise():
    rows = table([
        synthetic("row 1", [36, 36, 36], 100),
        synthetic("fast but worse", [0.36, 0.36, 0.36], 130),
        synthetic("frugal best", [3.6, 3.6, 7.2], 101),
        synthetic("llama.cpp dense", [7.2, 7.2, 7.2], 100, peer=True),
        synthetic("llama.cpp moe", [1.0, 1.0, 1.0], 90, peer=True, quality_of="moe"),
    ], 1.0)  # fmt: skip
    head = headline(rows, tolerance=0.02)  # 101 is within exp(0.02) of 100; 130 is not
    assert head["best"] == "frugal best" and head["peer"] == "llama.cpp dense"
    assert head["vs_row1"] == pytest.approx({"median": 10.0, "min": 5.0, "max": 10.0, "repeats": 3})
    assert head["vs_peer"]["median"] == pytest.approx(2.0) and head["vs_peer"]["min"] == pytest.approx(1.0)
    assert headline(rows, tolerance=0.0)["best"] is None  # nothing else is as good as row 1 at zero tolerance
