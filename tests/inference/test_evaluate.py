"""Measuring models: perplexity through the KV cache, the bytes a forward pass reads, peak memory."""

import math

import torch
import torch.nn.functional as F

from inference.evaluate import ByteCounter, perplexity, tensor_bytes
from inference.runtime.kv_cache import use_int8_kv_cache
from inference.runtime.quantize import quantize_linears
from model.config import debug_tiny
from model.transformer import Transformer


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug_tiny()).eval()


def test_perplexity_through_the_cache_equals_one_full_forward():
    model = tiny()
    rows = torch.randint(0, 512, (5, 41))
    with torch.no_grad():
        logits = model(rows[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    for chunk, batch in ((8, 2), (40, 16), (7, 3)):
        ppl, mean_nll = perplexity(model, rows, chunk=chunk, batch=batch)
        assert math.isclose(mean_nll, nll, rel_tol=1e-5) and math.isclose(ppl, math.exp(nll), rel_tol=1e-5)
    use_int8_kv_cache(model)  # now the cache is read back quantized: close, but not the same
    _, int8_nll = perplexity(model, rows, chunk=8)
    assert int8_nll != nll and abs(int8_nll - nll) < 0.01 * nll


def test_byte_counter_counts_what_one_decode_step_reads():
    model = tiny()
    c = model.config
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), 0, cache)
        with ByteCounter(model) as counter:
            model(torch.tensor([[4]]), 3, cache)
    moe = model.moe_layers()[0]
    experts_used = len(set(moe.last_routing.expert_NK[0].tolist()))
    all_weights = sum(tensor_bytes(p) for p in model.parameters())  # the tied table once
    expert_bytes = tensor_bytes(moe.w1_EFD[0], moe.w3_EFD[0], moe.w2_EDF[0])
    expected = (
        all_weights
        - (c.n_routed_experts - experts_used) * expert_bytes  # routed experts no token was sent to
        + c.d_model * 4  # the embedding row looked up (the table itself is read as the tied lm_head)
        + tensor_bytes(moe.router.bias)
        + c.n_layers * 2 * 4 * c.n_heads * c.head_dim * 4  # keys and values of 4 positions per layer
    )
    assert counter.bytes == expected
    with torch.no_grad():  # the hooks are gone
        before = counter.bytes
        model(torch.tensor([[5]]), 4, cache)
    assert counter.bytes == before


def test_quantized_layers_read_fewer_bytes():
    model = tiny()
    tokens = torch.tensor([[4]])
    with torch.no_grad(), ByteCounter(model) as fp32:
        model(tokens)
    quantize_linears(model, "int4", group_size=32)
    with torch.no_grad(), ByteCounter(model) as int4:
        model(tokens)
    assert int4.bytes < 0.5 * fp32.bytes


PEAK_SCRIPT = """
import time, torch
from inference.evaluate import PeakMemory
with PeakMemory(interval=0.001) as peak:
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    deadline = time.monotonic() + 2  # kept until the sampler has seen it (a loaded machine may not schedule it soon)
    while peak.bytes < 48 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.005)
    del x
after = peak.bytes
with PeakMemory(interval=0.001) as idle:
    time.sleep(0.05)
print(after, idle.bytes)
"""


def test_peak_memory_sees_a_temporary_allocation():
    """In a fresh process: in this one, earlier tests' freed memory may still be resident and be reused, so that a
    new tensor raises no resident memory at all (seen under xdist)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    peak, idle = map(int, out.stdout.split())
    assert peak >= 48 * 2**20 and idle < 8 * 2**20  # the 64 MiB tensor, and nothing while nothing is allocated
