"""The benchmark: configurations measured in fresh processes."""

import math

import pytest
import torch

from inference.benchmark import Config, Workload, run


@pytest.mark.slow
def test_a_configuration_is_measured_in_its_own_process(tiny_package, tmp_path):
    torch.manual_seed(0)
    held_out = torch.randint(3, 512, (4, 33))
    workload = Workload(held_out, [[5, 9, 200], [17, 4]], new_tokens=6, gamma=3)
    target, draft = str(tiny_package / "target"), str(tiny_package / "draft")
    results = run([Config("tiny int8", target, draft), Config("tiny alone", target)], workload, tmp_path, log=print)
    r = results["tiny int8"]
    assert r["identical"] is True  # speculation changed no greedy token
    for mode in ("plain", "speculative"):
        m = r[mode]
        assert m["tokens"] <= 12 and m["tokens_per_s"] > 0 and m["peak_bytes"] > 0
        assert m["p95_ms"] >= m["p50_ms"] >= 0 and m["ttft_ms"] > 0
    assert 0 <= r["speculative"]["acceptance_rate"] <= 1
    assert r["speculative"]["weight_bytes"] > r["plain"]["weight_bytes"]  # the draft's weights too
    assert "speculative" not in results["tiny alone"]
    # perplexity and bits per byte describe the same predictions
    assert math.isclose(r["perplexity"], math.exp(r["nll"])) and r["bits_per_byte"] > 0
    assert r["perplexity"] == pytest.approx(results["tiny alone"]["perplexity"])
