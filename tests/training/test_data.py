import dataclasses
import itertools

import pytest
import torch

from model.config import debug_tiny
from model.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.config import DataConfig
from training.data import PackedLoader, check_compatible, is_validation


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"id": f"d{i:03d}", "text": prose(i, 30 + i % 50), "quality_score": (i % 10) / 10} for i in range(120)]
    build_curriculum(
        [str(write_jsonl(d / "scored.jsonl", rows))], d / "shards", CurriculumConfig(target_shard_bytes=4000)
    )
    train_tokenizer(d / "shards", d / "tok", TokenizerConfig(vocab_size=512))
    return d / "shards", load_tokenizer(d / "tok" / "tokenizer.json")


def config(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(seq_len=32, batch_size=2, validation_fraction=0.1), **changes)


def test_packing_keeps_every_token_in_curriculum_order(shards):
    shard_dir, tok = shards
    loader = PackedLoader(shard_dir, tok, config())
    batches = list(loader)
    stream = torch.cat([b.reshape(-1) for b in batches]).tolist()
    expected = []
    for bucket in loader.schedule:
        for doc_id, text in loader.reader.documents(bucket):
            if not is_validation(doc_id, 0.1):
                expected += [*tok.encode(text).ids, tok.token_to_id("<|eos|>")]
    assert all(b.shape == (2, 33) and b.dtype == torch.int64 for b in batches)
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 2 * 33


def test_resume_gives_the_same_batches(shards):
    shard_dir, tok = shards
    uninterrupted = list(itertools.islice(PackedLoader(shard_dir, tok, config()), 12))
    first = PackedLoader(shard_dir, tok, config())
    head = list(itertools.islice(iter(first), 5))
    state = first.state_dict()
    second = PackedLoader(shard_dir, tok, config())
    second.load_state_dict(state)
    tail = list(itertools.islice(iter(second), 7))
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, head + tail))


def test_schedule_and_validation_split(shards):
    shard_dir, tok = shards
    loader = PackedLoader(shard_dir, tok, config(bucket_schedule=[5, 0]))
    assert loader.schedule == [5, 0]
    validation = loader.validation_texts()
    assert set(validation) == set(range(6)) and sum(len(v) for v in validation.values()) > 0
    train_texts = set(loader._training_texts())
    assert not train_texts & {t for v in validation.values() for t in v}
    with pytest.raises(ValueError, match="bucket_schedule"):
        PackedLoader(shard_dir, tok, config(bucket_schedule=[9]))


def test_bad_inputs_fail_before_training(shards, tmp_path):
    _shard_dir, tok = shards
    with pytest.raises(ValueError, match="no manifest"):
        PackedLoader(tmp_path, tok, config())
    with pytest.raises(ValueError, match="vocab_size=8192"):
        check_compatible(tok, dataclasses.replace(debug_tiny(), vocab_size=8192))
    check_compatible(tok, debug_tiny())  # 512 = 512
