"""The GGUF export and the transformers twin (inference.gguf_export): the file holds the model's tensors and
hyperparameters (read back with gguf's reader), LlamaForCausalLM computes Frugal's logits, and llama.cpp
(llama-cpp-python, built by `make llama-cpp`, which CI runs first) decodes Frugal's greedy tokens from it."""

import dataclasses

import numpy as np
import pytest
import torch

from inference.gguf_export import llama_cpp_quantize, tensors, write_gguf
from inference.hf_export import to_hf
from inference.runtime.generate import Generator, SamplingConfig
from model.config import debug_tiny, dense_baseline
from model.transformer import Transformer

PROMPT = [5, 17, 300, 42, 99, 101, 7, 64]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(dense_baseline(debug_tiny()), n_kv_heads=2, d_ff=96)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper logits: greedy choices far from ties
    return model


@pytest.fixture(scope="module")
def gguf_file(dense, tiny_tokenizer, tmp_path_factory):
    return write_gguf(dense, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_the_file_holds_the_tensors_and_hyperparameters(dense, gguf_file):
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    cfg = dense.config
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"]) == (cfg.n_layers, cfg.d_model)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.feed_forward_length"] == 96 and fields["llama.rope.dimension_count"] == cfg.head_dim
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size and fields["tokenizer.ggml.model"] == "gpt2"
    want = tensors(dense)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want) and "output.weight" not in got  # tied: llama.cpp projects with token_embd
    for name, t in want.items():
        assert np.array_equal(np.asarray(got[name].data).reshape(t.shape), t.numpy()), name


def test_llama_for_causal_lm_computes_the_same_logits(dense):
    hf = to_hf(dense)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, dense(ids), rtol=1e-4, atol=1e-4)
        out = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out[0, len(PROMPT) :].tolist() == Generator(dense).generate_ids(PROMPT, SamplingConfig(max_new_tokens=12))


def test_llama_cpp_decodes_frugals_greedy_tokens(dense, gguf_file):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make llama-cpp`")
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    got = []
    for _ in range(12):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    assert got == Generator(dense).generate_ids(PROMPT, SamplingConfig(max_new_tokens=12))
    torch.testing.assert_close(
        torch.from_numpy(np.array(llm.scores[len(PROMPT) - 1])), dense(torch.tensor([PROMPT]))[0, -1].detach(),
        rtol=1e-3, atol=1e-3,
    )  # fmt: skip


def test_untwinned_and_quantized_models_are_refused(tiny_tokenizer, tmp_path):
    from inference.runtime.quantize import quantize_linears

    with pytest.raises(ValueError, match="score_func"):  # llama.cpp's glm4moe gates with sigmoid
        write_gguf(Transformer(dataclasses.replace(debug_tiny(), score_func="softmax")), tiny_tokenizer,
                   tmp_path / "moe.gguf")  # fmt: skip
    model = Transformer(dense_baseline(debug_tiny()))
    quantize_linears(model, "int8")
    with pytest.raises(ValueError, match="fp32 model"):
        write_gguf(model, tiny_tokenizer, tmp_path / "int8.gguf")
    assert not (tmp_path / "moe.gguf").exists()


def llama_cpp_nll(path, tokens: list[int]) -> float:
    """Mean negative log-likelihood llama.cpp gives tokens[1:] after their prefixes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make llama-cpp`")
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens)
    logits = torch.from_numpy(np.array(llm.scores[: len(tokens) - 1]))
    return -logits.log_softmax(-1).gather(1, torch.tensor(tokens[1:])[:, None]).mean().item()


def test_llama_cpp_runs_the_f16_and_q8_0_files_within_a_perplexity_budget(dense, gguf_file, tiny_tokenizer, tmp_path):
    """On a row of 48 tokens sampled from the model (seeded), the F16 and Q8_0 files' perplexities under llama.cpp stay
    within 1% of F32's."""
    row = Generator(dense).generate_ids(PROMPT, SamplingConfig(max_new_tokens=40, temperature=1.0, seed=3))
    tokens = PROMPT + row
    f32 = llama_cpp_nll(gguf_file, tokens)
    for outtype in ("f16", "q8_0"):
        path = write_gguf(dense, tiny_tokenizer, tmp_path / f"tiny-{outtype}.gguf", outtype=outtype)
        assert abs(np.exp(llama_cpp_nll(path, tokens)) / np.exp(f32) - 1) < 0.01, outtype
    q8_by_llama_cpp = llama_cpp_quantize(gguf_file, tmp_path / "tiny-llama-q8_0.gguf", 7)  # its own quantizer
    assert abs(np.exp(llama_cpp_nll(q8_by_llama_cpp, tokens)) / np.exp(f32) - 1) < 0.01


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(debug_tiny(), n_kv_heads=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for layer in model.moe_layers():
            layer.router.bias.copy_(torch.randn_like(layer.router.bias) * 0.1)  # selection differs from scores
    return model


def test_llama_cpp_runs_the_moe_model_as_glm4moe(moe, tiny_tokenizer, tmp_path):
    """The MoE model as llama.cpp's glm4moe: its logits at every position of a prompt match Frugal's within 1e-3
    of the logit scale, and it decodes the same greedy tokens."""
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make llama-cpp`")
    path = write_gguf(moe, tiny_tokenizer, tmp_path / "moe.gguf")
    fields = {n: f.contents() for n, f in gguf.GGUFReader(str(path)).fields.items() if not n.startswith("GGUF.")}
    assert fields["general.architecture"] == "glm4moe" and fields["glm4moe.expert_gating_func"] == 2  # sigmoid
    assert (fields["glm4moe.expert_count"], fields["glm4moe.expert_used_count"]) == (4, 2)
    tokens = Generator(moe).generate_ids(PROMPT, SamplingConfig(max_new_tokens=24, temperature=1.0, seed=5))
    row = PROMPT + tokens
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(row)
    got, want = torch.from_numpy(np.array(llm.scores[: len(row)])), moe(torch.tensor([row]))[0].detach()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    llm.reset()
    llm.eval(PROMPT)
    greedy = []
    for _ in range(12):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    assert greedy == Generator(moe).generate_ids(PROMPT, SamplingConfig(max_new_tokens=12))
