"""Weight-only INT8 and INT4: error bounds, the native kernels against dequantized references, and a
quantized model's logits against fp32."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from inference.runtime.quantize import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    apply_quantized,
    load_quantized,
    matrices,
    quantize_int4,
    quantize_int8,
    quantize_linears,
    quantize_weights,
    save_quantized,
    stack_rows,
)
from model.config import debug_tiny, dense_baseline
from model.io import WEIGHTS_FILE
from model.transformer import Transformer
from tests.conftest import cpu_capabilities, run_under_capability


def test_int8_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3  # rows of different scales
    q = quantize_int8(w)
    assert q.q_NK.dtype == torch.int8
    assert ((q.dequantize() - w).abs() <= q.scale_N[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_error_is_at_most_half_a_step_per_group(group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 256) + torch.linspace(-1, 1, 256)  # groups with offsets: asymmetric helps
    q = quantize_int4(w, group_size, symmetric)
    assert int(q.q_NK.max()) <= 15 and q.scale_NG.shape == (16, 256 // group_size)
    step = q.scale_NG.repeat_interleave(group_size, 1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_asymmetric_int4_is_closer_on_offset_groups():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.1 + 1.0  # every group far from zero
    err = {s: (quantize_int4(w, 32, s).dequantize() - w).pow(2).mean() for s in (False, True)}
    assert err[False] < err[True] / 4


def test_unsupported_group_sizes_are_refused():
    with pytest.raises(ValueError, match="unsupported INT4 group size 48"):
        quantize_int4(torch.randn(8, 96), 48)


def test_native_kernels_match_the_dequantized_weights():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(5, 128)
    q8 = quantize_int8(w)
    reference = x @ q8.dequantize().T
    assert (Int8Linear(q8)(x) - reference).abs().max() < 0.02 * reference.abs().max()  # bf16 activations
    q4 = quantize_int4(w, 32)
    reference = x @ q4.dequantize().T
    assert (Int4Linear(q4)(x) - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 activations


@pytest.mark.parametrize(("scheme", "min_cos", "max_kl"), [("int8", 0.9999, 1e-3), ("int4", 0.98, 0.05)])
def test_quantized_dense_model_logits_stay_close(scheme, min_cos, max_kl):
    torch.manual_seed(0)
    config = dataclasses.replace(dense_baseline(debug_tiny()), d_model=128, d_ff=256, n_heads=4)
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(tokens)
        n = quantize_linears(model, scheme, group_size=32)
        out = model(tokens)
    assert n == config.n_layers * 7 + 1  # q k v o, w1 w2 w3 per layer, and the lm_head
    cos = F.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1), dim=-1).min().item()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert cos > min_cos and kl < max_kl, (cos, kl)


@pytest.mark.parametrize(("scheme", "min_cos"), [("int8", 0.9999), ("int4", 0.98)])
def test_every_expert_of_an_moe_model_is_quantized(scheme, min_cos):
    torch.manual_seed(0)
    config = debug_tiny()
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        n = quantize_linears(model, scheme, group_size=32)
        out = model(tokens)
    moe = model.moe_layers()[0]
    assert moe.quantized is not None and not hasattr(moe, "w1_EFD")
    linears = config.n_layers * 4 + 3 + 3 * config.n_shared_experts + 1  # attention, dense ffn, shared, head
    assert n == linears + 3 * config.n_routed_experts
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    cos = F.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1), dim=-1).min().item()
    assert cos > min_cos


@pytest.mark.parametrize("cfg", [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 32, True)])
def test_a_saved_quantized_model_loads_to_the_same_logits(tmp_path, cfg):
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    scales = {name: torch.rand(w.shape[1]) + 0.5 for name, w in matrices(model).items()}  # as AWQ gives
    weights = quantize_weights(model, cfg, scales)
    save_quantized(model, weights, cfg, tmp_path / "q")
    apply_quantized(model, weights)
    loaded = load_quantized(tmp_path / "q")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    if cfg.scheme == "int4":  # two 4-bit values per stored byte
        stored = load_file(str(tmp_path / "q" / WEIGHTS_FILE))
        assert stored["layers.0.attn.wq.q"].shape == (64, 32) and stored["layers.0.attn.wq.q"].dtype == torch.uint8


def test_broken_quantized_folders_are_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    cfg = QuantConfig("int4", 32)
    save_quantized(model, quantize_weights(model, cfg), cfg, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / WEIGHTS_FILE))
    tensors["layers.1.ffn.experts.2.w3.scale"] = tensors["layers.1.ffn.experts.2.w3.scale"][:, :1].contiguous()
    save_file(tensors, str(tmp_path / "q" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"model\.safetensors: layers\.1\.ffn\.experts\.2\.w3\.scale has shape"):
        load_quantized(tmp_path / "q")
    del tensors["layers.1.ffn.experts.2.w3.scale"]
    save_file(tensors, str(tmp_path / "q" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"missing layers\.1\.ffn\.experts\.2\.w3\.scale"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / "quantization.json").write_text('{"scheme": "int4", "group_size": 48}')
    with pytest.raises(ValueError, match=r"quantization\.json: .*unsupported INT4 group size 48"):
        load_quantized(tmp_path / "q")
    with pytest.raises(ValueError, match=r"unsupported INT4 group size 48"):
        quantize_weights(model, QuantConfig("int4", 48))
    # d_model 64 does not split into groups of 128: its matrices take the largest group that splits it
    assert quantize_weights(model, QuantConfig("int4", 128))["layers.0.attn.wq"].group_size == 64


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_quantized_layers_run_on_misaligned_weights_under_every_cpu_capability(tmp_path, capability):
    """Weights read from a file at 8 bytes past a 16-byte boundary (where the AVX-512 INT8 kernel crashed),
    INT8 and INT4, at prefill (9 rows), decode (1 row through the KV cache), a single token (experts left
    without tokens) and an expert layer given 0 rows; plus an INT8 layer 40 inputs wide (padded to 48). In a
    subprocess per ATEN_CPU_CAPABILITY: a segfault fails this test."""
    proc = run_under_capability(capability, ["-m", "tests.inference.runtime.misaligned_load", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["capability"] == capability.upper()  # the variable took effect
    for scheme, tolerance in (("int8", 0.01), ("int4", 0.08)):  # bf16 activations; INT4 with 32-wide groups
        assert report[f"{scheme}_raw_q_address_mod_16"] == [8]  # the file really is misaligned
        for case in ("prefill", "decode", "one_token"):
            assert report[f"{scheme}_{case}_error"] < tolerance, (scheme, case, report)
        assert report[f"{scheme}_empty_expert_shapes"] == [[0, 32], [0, 64]]  # (0, d_expert), (0, d_model)
    assert report["int8_width40_error"] < 0.01


def test_int4_takes_every_width_llama_cpp_blocks_take(tmp_path):
    """A dense model whose d_ff (480) splits into 32-wide blocks but not 64-wide groups quantizes at group 64:
    its down projection falls back to groups of 32, saved and loaded as such; a width of no group (48) is
    refused, naming the matrix."""
    from dataclasses import replace

    from inference.runtime.quantize import group_for
    from model.config import dense_baseline

    assert [group_for(k, 64) for k in (256, 480, 96, 40)] == [64, 32, 32, None]
    assert group_for(480, 128) == 32 and group_for(384, 128) == 128
    torch.manual_seed(0)
    model = Transformer(replace(dense_baseline(debug_tiny()), d_ff=480)).eval()
    cfg = QuantConfig("int4", 64)
    weights = quantize_weights(model, cfg)
    assert weights["layers.0.ffn.w2"].group_size == 32  # (64, 480): 480 % 64 != 0
    assert weights["layers.0.ffn.w1"].group_size == 64
    save_quantized(model, weights, cfg, tmp_path / "q")
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        apply_quantized(model, weights)
        quantized = model(tokens)
        loaded = load_quantized(tmp_path / "q")(tokens)
    torch.testing.assert_close(loaded, quantized, rtol=0, atol=0)
    assert F.cosine_similarity(quantized.flatten(0, 1), ref.flatten(0, 1), dim=-1).min() > 0.98
    narrow = Transformer(replace(dense_baseline(debug_tiny()), d_ff=48)).eval()
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.w2: a weight with 48 inputs cannot be split"):
        quantize_weights(narrow, cfg)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stacked_layers_give_each_layers_outputs_bit_for_bit(scheme):
    from inference.runtime.engine.compiled import fused_projections

    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    quantize_linears(model, scheme, group_size=32)
    attn, ffn = model.layers[0].attn, model.layers[0].ffn  # layer 0 is dense in debug_tiny
    x = torch.randn(7, attn.wq.in_features)
    stacked = stack_rows([attn.wq, attn.wk, attn.wv])
    assert torch.equal(stacked(x), torch.cat([attn.wq(x), attn.wk(x), attn.wv(x)], -1))
    fused = fused_projections(model.layers)
    assert id(attn) in fused and id(ffn) in fused  # q/k/v and w1/w3 of the dense layer
    assert torch.equal(fused[id(ffn)](x), torch.cat([ffn.w1(x), ffn.w3(x)], -1))
    assert stack_rows([nn.Linear(64, 64, bias=False)] * 2) is None  # float layers stay apart
    if scheme == "int4":
        assert stack_rows([attn.wq, quantize_one_int4(40, 64)]) is None  # 40 rows: not whole 16-row tiles


def quantize_one_int4(n_out: int, n_in: int) -> Int4Linear:
    return Int4Linear(quantize_int4(torch.randn(n_out, n_in), 32))
