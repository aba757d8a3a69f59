"""The roofline cost model: its bytes at batch 1 are what the running model reads (ByteCounter), and its bounds
behave as a roofline should."""

import dataclasses

import pytest
import torch

from inference.evaluate import ByteCounter
from inference.roofline import GPUS, Device, expected_experts, project, step_bytes, step_flops
from model.config import debug_tiny, dense_baseline, moe_1b
from model.transformer import Transformer

CONFIGS = [debug_tiny(), dense_baseline(debug_tiny()), dataclasses.replace(debug_tiny(), n_kv_heads=2)]


@pytest.mark.parametrize("config", CONFIGS, ids=["moe", "dense", "gqa"])
def test_bytes_of_one_decoding_step_match_what_the_model_reads(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    context = 24
    cache = model.new_cache(1, context + 1)
    with torch.no_grad():
        model(torch.randint(3, 500, (1, context)), 0, cache)
        with ByteCounter(model) as counter:
            model(torch.tensor([[7]]), context, cache)
    # attention reads the cached positions and the new one
    assert step_bytes(config, 1, context + 1) == pytest.approx(counter.bytes, rel=1e-6)


def test_experts_touched_grow_with_the_batch_up_to_all_of_them():
    assert expected_experts(8, 2, 1) == pytest.approx(2)
    assert expected_experts(8, 2, 4) < 4 * 2 and expected_experts(8, 2, 1000) == pytest.approx(8)
    moe = moe_1b()
    per_token_1, per_token_64 = step_bytes(moe, 1, 0, 2), step_bytes(moe, 64, 0, 2) / 64
    assert per_token_64 < per_token_1 / 10  # batching shares the weights


def test_decoding_is_memory_bound_at_batch_1_and_compute_bound_at_a_large_batch():
    gpu = Device("H100 SXM", **GPUS["H100 SXM"], price_per_hour=2.5)
    # a short context: at a long one the batch's KV cache keeps even a large batch memory-bound
    small, large = project(moe_1b(), gpu, 1, 16, 2, 2), project(moe_1b(), gpu, 4096, 16, 2, 2)
    assert small["bound"] == "memory" and large["bound"] == "compute"
    assert small["tokens_per_s"] == pytest.approx(gpu.bandwidth / small["bytes_per_step"])
    assert large["tokens_per_s"] == pytest.approx(4096 * gpu.flops / step_flops(moe_1b(), 4096, 16))
    assert large["usd_per_1m"] < small["usd_per_1m"]
    assert small["usd_per_1m"] == pytest.approx(2.5 / (small["tokens_per_s"] * 3600) * 1e6)
