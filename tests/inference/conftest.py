"""A tiny inference package, built the way a release builds one: an INT8 debug_tiny target and an fp32
debug_tiny_draft draft (untrained weights), a tokenizer trained on prose, a manifest."""

import shutil

import pytest
import torch

from inference.release import assemble
from inference.runtime.quantize import QuantConfig, quantize_weights, save_quantized
from model.config import debug_tiny, debug_tiny_draft
from model.io import save_model
from model.tokenizer import TokenizerConfig, train_tokenizer
from model.transformer import Transformer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """tokenizer.json: a 512-token BPE trained on curriculum shards of prose."""
    d = tmp_path_factory.mktemp("tokenizer")
    rows = [{"id": f"d{i}", "text": prose(i, 60), "quality_score": 0.5} for i in range(60)]
    build_curriculum([str(write_jsonl(d / "scored.jsonl", rows))], d / "shards", CurriculumConfig())
    train_tokenizer(d / "shards", d / "tok", TokenizerConfig(vocab_size=512))
    return d / "tok" / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("package")
    torch.manual_seed(0)
    target, draft = Transformer(debug_tiny()), Transformer(debug_tiny_draft())
    cfg = QuantConfig("int8")
    save_quantized(target, quantize_weights(target, cfg), cfg, d / "target")
    save_model(draft.state_dict(), draft.config, d / "draft")
    for role in ("target", "draft"):
        shutil.copy(tiny_tokenizer, d / role / "tokenizer.json")
    meta = {"name": "frugal-tiny", "version": "0.0.1", "scheme": "int8", "kv_cache": "int8", "gamma": 3}
    assemble(d / "pkg", d / "target", d / "draft", meta, "# frugal-tiny\n\nA test package.\n")
    return d / "pkg"


@pytest.fixture(scope="session")
def long_package(tmp_path_factory, tiny_tokenizer):
    """An fp32 package with a 2048-token context and no draft: greedy decoding of 2000 tokens takes seconds,
    long enough to disconnect a client or pass a time limit mid-request."""
    import dataclasses

    d = tmp_path_factory.mktemp("long-package")
    torch.manual_seed(0)
    target = Transformer(dataclasses.replace(debug_tiny(), max_seq_len=2048))
    save_model(target.state_dict(), target.config, d / "target")
    shutil.copy(tiny_tokenizer, d / "target" / "tokenizer.json")
    meta = {"name": "frugal-long", "version": "0.0.1", "scheme": "fp32", "kv_cache": "fp32", "gamma": 3}
    assemble(d / "pkg", d / "target", None, meta, "# frugal-long\n\nA test package.\n")
    return d / "pkg"


@pytest.fixture(scope="session")
def mtp_package(tmp_path_factory, tiny_tokenizer):
    """An INT8 debug_tiny target with two MTP modules (quantized with it, in its model.safetensors) and no draft:
    the release's layout when the model proposes its own speculative tokens."""
    import dataclasses

    d = tmp_path_factory.mktemp("mtp-package")
    torch.manual_seed(0)
    target = Transformer(dataclasses.replace(debug_tiny(), mtp_depth=2))
    cfg = QuantConfig("int8")
    save_quantized(target, quantize_weights(target, cfg), cfg, d / "target")
    shutil.copy(tiny_tokenizer, d / "target" / "tokenizer.json")
    meta = {"name": "frugal-mtp", "version": "0.0.1", "scheme": "int8", "kv_cache": "fp32", "gamma": 3,
            "proposer": "mtp", "draft": False}  # fmt: skip
    assemble(d / "pkg", d / "target", None, meta, "# frugal-mtp\n\nA test package.\n")
    return d / "pkg"
