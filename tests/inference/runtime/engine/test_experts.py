"""Grouped experts against the MoE layer's own per-expert loop: fp32 close, INT8 and INT4 bit for bit, and what
cannot be stacked (differing AWQ input scales) left to the loop."""

import pytest
import torch

from inference.runtime.engine.compiled import compile_options
from inference.runtime.engine.experts import GroupedExperts
from inference.runtime.quantize import QuantConfig, apply_quantized, quantize_weights
from model.config import debug_tiny
from model.transformer import Transformer
from tests.conftest import cpu_capabilities, run_under_capability


def moe_layer(scheme: str, awq_scales: bool = False):
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    if scheme != "fp32":
        weights = quantize_weights(model, QuantConfig(scheme, group_size=32))
        if awq_scales:  # AWQ gives each expert its own input scales
            for name, w in weights.items():
                if ".experts." in name:
                    w.input_scale_K = torch.rand(w.q_NK.shape[1]) + 0.5
        apply_quantized(model, weights)
    return model.moe_layers()[0]


@pytest.mark.parametrize("scheme,exact", [("fp32", False), ("int8", True), ("int4", True)])
@pytest.mark.parametrize("n_tokens", [1, 5, 33])
def test_grouped_experts_match_the_loop(scheme, exact, n_tokens):
    moe = moe_layer(scheme)
    grouped = GroupedExperts(moe)
    assert grouped.usable
    x = torch.randn(n_tokens, 64) * 3
    with torch.no_grad():
        want, got = moe(x[None])[0], grouped(x)
    if exact:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_differing_input_scales_keep_the_loop():
    assert not GroupedExperts(moe_layer("int8", awq_scales=True)).usable
    assert not GroupedExperts(moe_layer("int4", awq_scales=True)).usable


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_grouped_int8_experts_under_every_cpu_capability(capability):
    """The stacked INT8 products and the sparse mode's INT4 read-back go through torch's native kernels (the sparse
    mode also compiles, in every format): run them in a subprocess per
    ATEN_CPU_CAPABILITY the machine supports, so that a crash fails this test instead of a server."""
    proc = run_under_capability(capability, ["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                                             "-k", "(test_grouped_experts_match_the_loop and not fp32) or "
                                             "test_sparse_experts_match_the_loop"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4", "int8-awq"])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_sparse_experts_match_the_loop(scheme, n_tokens):
    """The sparse mode (only the chosen experts' weights, gathered) gives the per-expert loop's output in every
    format, AWQ's per-expert input scales included, eager and compiled."""
    moe = moe_layer(scheme.removesuffix("-awq"), awq_scales=scheme.endswith("awq"))
    grouped = GroupedExperts(moe)
    x = torch.randn(n_tokens, 64) * 3
    # compiled with the engine's options: they carry the vector width into inductor's cache key (under another
    # ATEN_CPU_CAPABILITY a graph cached without it is reused as the wrong source)
    options = compile_options(torch.device("cpu"), autotune=False)
    with torch.no_grad(), torch._inductor.config.patch(options):
        want = moe(x[None])[0]
        eager = grouped.sparse(x)
        compiled = torch.compile(grouped.sparse, fullgraph=True, dynamic=False)(x)
    # the native INT8/INT4 kernels take bf16 activations; the sparse mode multiplies in fp32
    atol = 1e-5 if scheme == "fp32" else 0.03 * want.abs().max().item()
    for got in (eager, compiled):
        assert torch.allclose(got, want, atol=atol, rtol=1e-3), (got - want).abs().max()


def test_sparse_mode_is_chosen_always_for_float_and_int8_and_for_int4_up_to_a_bound():
    from inference.runtime.engine.experts import use_sparse

    assert all(use_sparse(n, moe_layer(scheme)) for n in (1, 2, 64) for scheme in ("fp32", "int8"))
    moe = moe_layer("int4")  # 4 experts, top 2: sparse up to 16 assignments
    assert use_sparse(1, moe) and use_sparse(8, moe) and not use_sparse(9, moe)
