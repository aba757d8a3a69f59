import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.curriculum import (
    SHARD_SCHEMA,
    CurriculumConfig,
    bucket_order,
    build_curriculum,
    build_curriculum_version,
    compression_ratio,
    readability,
    sha256_file,
    tiers,
    versions,
    word_entropy,
)
from tests.conftest import prose, write_jsonl
from training.data import ShardReader


def scored_corpus(tmp_path, n=60):
    rows = []
    for i in range(n):
        text = ("easy words again " * (5 + i % 7)) if i % 2 else prose(i, 40 + i)
        rows.append({"id": f"d{i:03d}", "text": text, "source": "s", "quality_score": (i * 37 % n) / n})
    return write_jsonl(tmp_path / "scored.jsonl", rows)


def test_difficulty_signals_rank_repetitive_text_easier():
    repetitive, varied = "the cat sat on the mat " * 30, prose(1, 180)
    assert compression_ratio(repetitive) < compression_ratio(varied)
    assert word_entropy(repetitive) < word_entropy(varied)
    assert readability("The cat sat. The dog ran.") < readability(
        "Extraordinarily complicated institutional arrangements necessitate considerable deliberation."
    )


def test_tiers_are_equal_sized_quantiles():
    assert tiers(np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0]), 3).tolist() == [2, 0, 1, 1, 2, 0]


def test_bucket_orders():
    easy = bucket_order(CurriculumConfig(n_quality_tiers=2, n_difficulty_tiers=2))
    assert easy == [(1, 0), (0, 0), (1, 1), (0, 1)]  # easy first, best quality first within
    anneal = bucket_order(CurriculumConfig(n_quality_tiers=2, n_difficulty_tiers=2, order="quality_annealing"))
    assert anneal == [(0, 0), (0, 1), (1, 0), (1, 1)]  # low quality first, ending on the best


def test_shards_manifest_order_and_determinism(tmp_path):
    src = scored_corpus(tmp_path)
    config = CurriculumConfig(target_shard_bytes=2000, row_group_rows=8)
    stats = build_curriculum([str(src)], tmp_path / "a", config)
    build_curriculum([str(src)], tmp_path / "b", config)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert stats.n_kept == 60 and manifest["n_rows"] == 60 and len(manifest["shards"]) > 1
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    buckets = []
    for shard in manifest["shards"]:
        path = tmp_path / "a" / shard["path"]
        assert path.read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
        table = pq.read_table(path)
        assert table.schema.equals(SHARD_SCHEMA, check_metadata=False) and table.num_rows == shard["rows"]
        buckets += table["bucket"].to_pylist()
    assert buckets == sorted(buckets)  # written in curriculum order
    assert [b["rows"] for b in manifest["buckets"]] == [buckets.count(b) for b in range(6)]
    assert manifest["config"]["order"] == "easy_to_hard" and manifest["code_version"]


def test_rejects_unscored_input_and_bad_config(tmp_path):
    src = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "text": "no score"}])
    with pytest.raises(ValueError, match="no scored documents"):
        build_curriculum([str(src)], tmp_path / "out")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        build_curriculum([str(src)], tmp_path / "out", CurriculumConfig(difficulty="vibes"))


def test_each_update_is_a_new_version_and_old_versions_stay_readable(tmp_path):
    rows = [{"id": f"d{i:03d}", "text": prose(i, 30 + i % 40), "quality_score": (i % 10) / 10} for i in range(90)]
    first = write_jsonl(tmp_path / "a.jsonl", rows[:60])
    second = write_jsonl(tmp_path / "b.jsonl", rows[60:])
    root = tmp_path / "shards"
    config = CurriculumConfig(target_shard_bytes=4000)
    v1 = build_curriculum_version([str(first)], root, config, log=None)
    again = build_curriculum_version([str(first)], root, config, log=None)
    assert (v1.number, v1.new) == (1, True) and (again.number, again.new) == (1, False)  # unchanged: no version
    v2 = build_curriculum_version([str(first), str(second)], root, config, log=None)
    assert (v2.number, v2.new) == (2, True) and [p.name for p in versions(root)] == ["v0001", "v0002"]
    latest, old = ShardReader(root), ShardReader(root / "versions" / "v0001")
    assert latest.manifest["n_rows"] == 90 and latest.manifest["version"] == 2 and old.manifest["n_rows"] == 60
    assert all(s["path"].startswith("versions/v0002/") for s in latest.manifest["shards"])
    assert json.loads((root / "stats.json").read_text())["n_kept"] == 90  # the ledger and stats follow the version
