import dataclasses
import itertools
import json

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
    train_texts = {t for _, t in loader._training_texts()}
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


def mixed(shard_dir, tok, total_steps=40, **changes) -> PackedLoader:
    return PackedLoader(shard_dir, tok, config(**changes), total_steps=total_steps)


def read_docs(loader: PackedLoader, n_batches: int) -> list[int]:
    """The bucket of every document the first n_batches batches began, in order (from take_mixture per batch)."""
    per_batch = []
    for _ in zip(range(n_batches), loader):
        per_batch.append({b: share for b, share in loader.take_mixture().items() if share})
    return per_batch


def test_a_mixture_without_weights_reads_every_document_once_in_a_random_order(shards):
    shard_dir, tok = shards
    loader = mixed(shard_dir, tok, mix_schedule=[{"until": 1.0}])
    texts = {}
    for bucket in loader.reader.buckets():
        for doc_id, text in loader.reader.documents(bucket):
            if not is_validation(doc_id, 0.1):
                texts[tok.encode(text).ids.__repr__()] = bucket
    n_docs = sum(loader.counts.values())
    assert n_docs == len(texts) > 90
    batches = iter(loader)
    while sum(loader.consumed.values()) < n_docs:
        next(batches)
    # one round: every training document exactly once before any second reading
    assert loader.consumed == loader.counts
    # the buckets come interleaved, not one after another: not the curriculum's order
    stream = torch.cat(list(itertools.islice(mixed(shard_dir, tok, mix_schedule=[{"until": 1.0}]), 20))).tolist()
    ordered = torch.cat(list(itertools.islice(PackedLoader(shard_dir, tok, config()), 20))).tolist()
    assert stream != ordered
    # another seed, another order; the same seed, the same stream
    again = torch.cat(list(itertools.islice(mixed(shard_dir, tok, mix_schedule=[{"until": 1.0}]), 20))).tolist()
    other = torch.cat(list(itertools.islice(mixed(shard_dir, tok, mix_schedule=[{"until": 1.0}], mix_seed=1), 20)))
    assert again == stream and other.tolist() != stream


def test_a_quality_anneal_reads_only_the_top_tier_after_its_boundary(shards):
    shard_dir, tok = shards
    loader = mixed(shard_dir, tok, total_steps=40, mix_schedule=[{"until": 0.5}, {"until": 1.0, "quality_tiers": [-1]}])
    tiers = loader.reader.quality_tiers()
    top = {b for b, t in tiers.items() if t == max(tiers.values())}
    assert len(top) == 2 and [m.buckets for m in loader.mixtures][1] == tuple(sorted(top))
    per_batch = read_docs(loader, 40)
    assert [loader.phase(s) for s in (0, 19, 20, 39)] == [0, 0, 1, 1]
    assert len(set().union(*per_batch[:20])) > 2  # the stable phase mixes every tier
    assert set().union(*per_batch[21:]) <= top  # batch 20 may finish a document begun before the boundary


def test_fixed_weights_draw_buckets_in_proportion(shards):
    shard_dir, tok = shards
    loader = mixed(shard_dir, tok, total_steps=200, mix_schedule=[{"until": 1.0, "weights": {"0": 3, "5": 1}}])
    for _ in zip(range(200), loader):
        pass
    drawn = {b: n for b, n in loader.consumed.items() if n}
    assert set(drawn) == {0, 5} and 2.3 < drawn[0] / drawn[5] < 3.9  # 3:1, binomial noise over ~500 draws


def test_a_resumed_mixture_gives_the_same_batches_across_the_phase_boundary(shards):
    shard_dir, tok = shards
    schedule = [{"until": 0.4}, {"until": 1.0, "quality_tiers": [-1, 0]}]
    whole = list(itertools.islice(mixed(shard_dir, tok, 30, mix_schedule=schedule), 30))
    first = mixed(shard_dir, tok, 30, mix_schedule=schedule)
    head = list(itertools.islice(iter(first), 9))
    second = mixed(shard_dir, tok, 30, mix_schedule=schedule)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    tail = list(itertools.islice(iter(second), 21))
    assert all(torch.equal(a, b) for a, b in zip(whole, head + tail)) and len(head + tail) == 30
    other = mixed(shard_dir, tok, 30, mix_schedule=[{"until": 1.0}])
    with pytest.raises(ValueError, match="saved mixture"):
        other.load_state_dict(first.state_dict())


def test_mixtures_the_shards_cannot_serve_are_refused_naming_the_field(shards, tmp_path):
    shard_dir, tok = shards
    with pytest.raises(ValueError, match=r"data.mix_schedule\[1\].weights names bucket\(s\) \[9\]"):
        mixed(shard_dir, tok, mix_schedule=[{"until": 0.5}, {"until": 1.0, "weights": {"9": 1, "0": 1}}])
    with pytest.raises(ValueError, match=r"data.mix_schedule\[0\].quality_tiers names tier 3"):
        mixed(shard_dir, tok, mix_schedule=[{"until": 1.0, "quality_tiers": [3]}])
    with pytest.raises(ValueError, match="a mix_schedule needs the run's steps"):
        next(iter(PackedLoader(shard_dir, tok, config(mix_schedule=[{"until": 1.0}]))))
    # shards without quality tiers (e.g. raw documents) cannot anneal by tier
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for b in manifest["buckets"]:
        del b["quality_tier"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="gives no bucket a quality_tier"):
        mixed(copy, tok, mix_schedule=[{"until": 1.0, "quality_tiers": [-1]}])
