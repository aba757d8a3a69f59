"""A roofline cost model of decoding: bytes and FLOPs per step, a device's bandwidth and FLOP/s, and $ per 1M
output tokens. A projection, not a measurement: it assumes the engine reaches the hardware's limits.

One decoding step of a batch of B requests, each at context L:
- **bytes read** = the weights the step touches (every dense matrix; for a MoE layer the shared experts, the
  router and its bias, and the routed experts any of the B tokens chose: at uniform routing
  n x (1 - (1 - k/n)^B) of the n experts, k per token), the B embedding rows, and the KV cache the B
  requests attend over (2 x layers x kv heads x head_dim x L per request);
- **FLOPs** = 2 x the matrix parameters a token uses x B (the LM head included), plus attention's
  4 x layers x d_model x L x B;
- **step time** = max(bytes / bandwidth, FLOPs / peak FLOP/s) + what a step spends outside the roofline: a
  fixed cost per step (dispatch) plus a cost per request in the batch (sampling, scheduling, delivering tokens);
  tokens/s = B / step time; $ per 1M output tokens = price per hour / (tokens/s x 3600) x 1e6.

On this CPU the two costs are measured from two rows (benchmark_report calibrates them on the dense model's
compiled rows at batch 1 and at its concurrency), and the MoE rows test the prediction. The GPU projection sets
them to zero: the ideal a CUDA-graph step approaches, labelled as such.

At B = 1 the bytes match what inference.evaluate.ByteCounter counts on the running model (a test holds them
together). `calibrate` measures this machine's bandwidth and matmul FLOP/s, so that the projection can be checked
against the CPU rows of the cost waterfall before it is trusted for a GPU (bench/gpu_cost.py checks it there).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig

GPUS = {
    # published datasheet figures: HBM bandwidth (bytes/s), dense bf16 tensor FLOP/s
    "H100 SXM": {"bandwidth": 3.35e12, "flops": 989e12},
    "H200": {"bandwidth": 4.8e12, "flops": 989e12},
    "A100 80GB SXM": {"bandwidth": 2.039e12, "flops": 312e12},
    "L4": {"bandwidth": 0.3e12, "flops": 121e12},
}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float
    """Bytes per second the weights and cache are read at."""
    flops: float
    """FLOP/s of the matrix products."""
    price_per_hour: float
    step_overhead_s: float = 0.0
    """Seconds a decoding step costs beyond the roofline, whatever its batch (dispatch)."""
    request_overhead_s: float = 0.0
    """Seconds a step costs beyond the roofline per request in its batch (sampling, scheduling, delivery)."""


def expected_experts(n: int, k: int, batch: int) -> float:
    """Distinct routed experts a batch touches when each token picks k of n uniformly."""
    return n * (1 - (1 - k / n) ** batch)


def step_bytes(
    config: ModelConfig, batch: int, context: int, weight_bytes: float = 4.0, kv_bytes: float = 4.0
) -> float:
    """Bytes one decoding step of `batch` requests at `context` positions reads (see the module docstring)."""
    d, kv = config.d_model, config.n_kv_heads or config.n_heads
    attn = d * config.head_dim * (2 * config.n_heads + 2 * kv)
    weights = 0.0
    for layer in range(config.n_layers):
        weights += attn + 2 * d  # attention and the two norms
        if config.is_moe_layer(layer):
            expert = 3 * d * config.d_expert
            touched = expected_experts(config.n_routed_experts, config.top_k, batch)
            weights += expert * (config.n_shared_experts + touched) + (d + 1) * config.n_routed_experts  # + router
        else:
            weights += 3 * d * config.d_ff
    weights += config.vocab_size * d + d  # the LM head (tied or not, it is read whole) and the final norm
    embed_rows = batch * d
    kv_cache = batch * 2 * config.n_layers * kv * config.head_dim * context
    return weight_bytes * (weights + embed_rows) + kv_bytes * kv_cache


def step_flops(config: ModelConfig, batch: int, context: int) -> float:
    # active_params counts a tied embedding once, as the LM head's matrix; an untied input embedding is a lookup
    matmul = config.active_params() - (0 if config.tie_embeddings else config.vocab_size * config.d_model)
    return batch * (2.0 * matmul + 4.0 * config.n_layers * config.d_model * context)


def project(config: ModelConfig, device: Device, batch: int, context: int, weight_bytes: float = 4.0,
            kv_bytes: float = 4.0) -> dict:  # fmt: skip
    """Predicted tokens/s and $ per 1M output tokens at `batch`, and which roof bounds it."""
    b = step_bytes(config, batch, context, weight_bytes, kv_bytes)
    f = step_flops(config, batch, context)
    memory_s, compute_s = b / device.bandwidth, f / device.flops
    roof = max(memory_s, compute_s)
    overhead = device.step_overhead_s + batch * device.request_overhead_s
    tokens_per_s = batch / (roof + overhead)
    return {
        "batch": batch,
        "context": context,
        "bytes_per_step": b,
        "flops_per_step": f,
        "roofline_s": roof,
        "bound": "overhead" if overhead > roof else ("memory" if memory_s >= compute_s else "compute"),
        "tokens_per_s": tokens_per_s,
        "usd_per_1m": device.price_per_hour / (tokens_per_s * 3600) * 1e6,
    }


def calibrate(threads: int, price_per_hour: float) -> Device:
    """This machine as a Device: the read bandwidth of a large sum and the FLOP/s of a large fp32 matmul, at
    `threads` threads."""
    import torch

    from inference.evaluate import memory_bandwidth
    from training.metrics import measure_peak_flops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return Device("this CPU", memory_bandwidth(), measure_peak_flops(), price_per_hour)
    finally:
        torch.set_num_threads(before)
