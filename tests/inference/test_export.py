"""Exports for other engines (inference.export): the Hugging Face folder loads in transformers with no custom
code and computes Frugal's logits and greedy tokens, for the MoE model (Glm4MoeForCausalLM) and a dense one
(LlamaForCausalLM); models without an exact equivalent are refused naming the field; GGUF files in F32, F16
and Q8_0 hold the types asked for."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from inference.export import export
from inference.runtime.generate import Generator, SamplingConfig
from model.config import debug_tiny, debug_tiny_draft
from model.io import save_model
from model.transformer import Transformer
from tests.conftest import ROOT

PROMPT = [5, 17, 300, 42, 99, 101, 7, 64]


def run_folder(path, config, tokenizer, seed=0):
    """A run folder as training writes one: weights, config.json and tokenizer.json (random weights, the
    router's selection bias set, logits sharpened so that greedy choices are far from ties)."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for moe in model.moe_layers():
            moe.router.bias.copy_(torch.randn_like(moe.router.bias) * 0.1)
    save_model(model.state_dict(), config, path)
    shutil.copy(tokenizer, path / "tokenizer.json")
    return path, model


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_tokenizer):
    return run_folder(tmp_path_factory.mktemp("moe") / "run", dataclasses.replace(debug_tiny(), n_kv_heads=2),
                      tiny_tokenizer)  # fmt: skip


def assert_twin(hf_dir, frugal: Transformer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    rows = torch.randint(0, frugal.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = frugal(rows).float(), hf(rows).logits.float()
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out[0, len(PROMPT) :].tolist() == Generator(frugal).generate_ids(PROMPT, SamplingConfig(max_new_tokens=12))
    return hf


def test_the_moe_model_exports_as_glm4moe_and_computes_frugals_logits(moe_run, tmp_path):
    from transformers import AutoTokenizer

    run, frugal = moe_run
    out = export(run, "hf", tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= names and not any(n.endswith(".bin") for n in names)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and "auto_map" not in config  # no custom code
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["norm_topk_prob"] is True
    hf = assert_twin(out, frugal)
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    from tokenizers import Tokenizer

    frugal_tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    text = "The function returns a list of values."
    assert tokenizer(text)["input_ids"] == frugal_tokenizer.encode(text).ids
    assert tokenizer.eos_token == "<|eos|>" and hf.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "Glm4MoeForCausalLM" in (out / "README.md").read_text()


def test_a_dense_model_exports_as_llama(tmp_path, tiny_tokenizer):
    run, frugal = run_folder(tmp_path / "dense", debug_tiny_draft(), tiny_tokenizer)
    out = export(run, "hf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert_twin(out, frugal)


@pytest.mark.parametrize(("change", "field"), [({"score_func": "softmax"}, "score_func"),
                                               ({"n_shared_experts": 0}, "n_shared_experts"),
                                               ({"top_p": 0.7}, "top_p")])  # fmt: skip
def test_a_model_without_an_exact_twin_is_refused_naming_the_field(tmp_path, tiny_tokenizer, change, field):
    run, _ = run_folder(tmp_path / "run", dataclasses.replace(debug_tiny(), **change), tiny_tokenizer)
    with pytest.raises(ValueError, match=field):
        export(run, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_top_p_exports_as_top_k_when_asked_and_the_card_says_so(tmp_path, tiny_tokenizer):
    run, _ = run_folder(tmp_path / "run", dataclasses.replace(debug_tiny(), top_p=0.7), tiny_tokenizer)
    out = export(run, "hf", tmp_path / "hf", approximate=True)
    assert "top_p=0.7 dynamic routing is exported as fixed top-2 routing" in (out / "README.md").read_text()


def test_bad_runs_and_outputs_are_refused_by_the_cli(moe_run, tmp_path):
    run, _ = moe_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "tokenizer.json").unlink()
    cmd = [sys.executable, "-m", "inference.export", "--format", "hf"]
    cases = [(["--run", str(run), "--out", str(tmp_path / "taken")], "not empty (pass --overwrite"),
             (["--run", str(broken), "--out", str(tmp_path / "o")], "tokenizer.json: missing")]  # fmt: skip
    for args, message in cases:
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "taken" / "file").read_text() == "x"


@pytest.mark.parametrize(("outtype", "matrix_type"), [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_files_hold_the_tensor_type_asked_for(tmp_path, tiny_tokenizer, outtype, matrix_type):
    import gguf

    run, frugal = run_folder(tmp_path / "dense", debug_tiny_draft(), tiny_tokenizer)
    path = export(run, "gguf", tmp_path / f"tiny-{outtype}.gguf", outtype=outtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.attn_norm.weight"] == "F32"
    if outtype == "q8_0":  # dequantized: within half a step of its block, plus the f16 scale's rounding (x127)
        [q] = [t for t in reader.tensors if t.name == "blk.0.ffn_up.weight"]
        got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(frugal.layers[0].ffn.w3.weight.shape)
        want = frugal.layers[0].ffn.w3.weight.detach().numpy()
        step = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127
        assert (np.abs(got - want).reshape(-1, 32) <= step * 0.6).all()


def test_mtp_modules_export_as_glm45_nextn_layers_that_compute_frugals_mtp_logits(tmp_path, tiny_tokenizer):
    """The exported layer n_layers + k - 1, read the way vLLM's and SGLang's GLM-4.5 MTP layer reads it
    (enorm, hnorm, eh_proj, transformers' own decoder layer, shared_head), gives Frugal's MTP logits; transformers
    itself loads the folder, ignores those layers and computes the main model's logits."""
    from safetensors.torch import load_file
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRMSNorm

    run, frugal = run_folder(tmp_path / "run", dataclasses.replace(debug_tiny(), n_kv_heads=2, mtp_depth=2),
                             tiny_tokenizer)  # fmt: skip
    out = export(run, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2
    hf = assert_twin(out, frugal)
    tensors = load_file(str(out / "model.safetensors"))
    L, T = frugal.config.n_layers, 20
    rows = torch.randint(0, frugal.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, want = frugal(rows, with_mtp=True)
        h = hf.model(rows).last_hidden_state  # through the final norm, as engines hand it to the MTP layer
        for k in (1, 2):
            p = f"model.layers.{L + k - 1}."
            layer = Glm4MoeDecoderLayer(hf.config, L + k - 1).eval()
            layer.load_state_dict({n.removeprefix(p): v for n, v in tensors.items() if n.startswith(p)
                                   and n.split(".")[3] in ("input_layernorm", "post_attention_layernorm", "self_attn",
                                                           "mlp")}, strict=True)  # fmt: skip
            norms = {}
            for name in ("enorm", "hnorm", "shared_head.norm"):
                norms[name] = Glm4MoeRMSNorm(hf.config.hidden_size, hf.config.rms_norm_eps)
                norms[name].weight.copy_(tensors[p + name + ".weight"])
            emb = torch.nn.functional.embedding(rows[:, k:], tensors[p + "embed_tokens.weight"])
            x = torch.cat([norms["enorm"](emb), norms["hnorm"](h[:, : T - k])], -1) @ tensors[p + "eh_proj.weight"].T
            positions = torch.arange(T - k)[None]
            h = layer(x, position_ids=positions, position_embeddings=hf.model.rotary_emb(x, positions))
            got = norms["shared_head.norm"](h) @ tensors[p + "shared_head.head.weight"].T
            assert ((got - want[k - 1]).abs().max() / want[k - 1].abs().max()).item() < 1e-4, k


def test_mtp_modules_without_a_glm45_layout_are_left_out_and_the_card_says_so(tmp_path, tiny_tokenizer):
    run, frugal = run_folder(tmp_path / "run", dataclasses.replace(debug_tiny(), mtp_depth=1, mtp_moe=False),
                             tiny_tokenizer)  # fmt: skip
    out = export(run, "hf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert "MTP module(s) are left out" in (out / "README.md").read_text()
    assert_twin(out, frugal)
