"""The data ablation: tokens-to-target on synthetic curves, the held-out split, and a tiny end-to-end run."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.tokenizer import TokenizerConfig, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.ablation import (
    HELDOUT_BUCKET,
    RESULTS_FILE,
    RUNS,
    AblationConfig,
    analyse,
    read_curated,
    run_ablation,
    split_inputs,
    tokens_to_target,
    write_shards,
)
from training.data import ShardReader, is_validation, run_validation_rows


def test_tokens_to_target_interpolates_between_evaluation_points():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tokens_to_target(curve, 3.5) == pytest.approx(250.0)
    assert tokens_to_target(curve, 4.0) == pytest.approx(200.0)
    assert tokens_to_target(curve, 3.0) == pytest.approx(300.0)
    # a curve that goes up again: the first crossing counts
    assert tokens_to_target([(100, 5.0), (200, 3.0), (300, 4.5)], 4.0) == pytest.approx(150.0)


def test_tokens_to_target_at_the_first_point_and_never_reached():
    assert tokens_to_target([(100, 2.0), (200, 1.5)], 3.0) == 100.0
    assert tokens_to_target([(100, 5.0), (200, 4.0), (300, 3.1)], 3.0) is None  # not extrapolated
    assert tokens_to_target([], 3.0) is None


def _records(losses: list[float], tokens_per_eval: int = 100, hours_per_token: float = 1e-6) -> list[dict]:
    out = []
    for n, loss in enumerate(losses, 1):
        t = n * tokens_per_eval
        out.append(
            {"step": n, "tokens": t, "device_hours": t * hours_per_token, f"val_loss/bucket{HELDOUT_BUCKET}": loss}
        )
    return out


def test_analyse_reports_tokens_hours_and_dollars_to_raws_final_loss():
    runs = {
        "raw": [_records([5.0, 4.0, 3.0, 2.0])],
        "curated_shuffled": [_records([4.5, 3.5, 2.5, 2.1])],  # never reaches 2.0
        "curated_curriculum": [_records([4.0, 3.0, 2.0, 1.5]), _records([4.0, 2.0, 2.0, 1.5])],  # two seeds
    }
    counts = {"raw_corpus": 1000, "curated_corpus": 400, "train_tokens": dict.fromkeys(RUNS, 100)}
    res = analyse(runs, counts, price=2.0)
    assert res["target_heldout_loss"] == 2.0
    assert res["to_target"]["curated_shuffled"] == {"reached": False, "tokens": None}
    cur = res["to_target"]["curated_curriculum"]  # mean curve 4.0, 2.5, 2.0, 1.5: reaches 2.0 at 300
    assert cur["tokens"] == pytest.approx(300) and cur["share_of_raw_tokens"] == pytest.approx(0.75)
    assert cur["device_hours"] == pytest.approx(3e-4) and cur["spend_usd"] == pytest.approx(6e-4)
    assert res["to_target"]["raw"]["tokens"] == pytest.approx(400)
    assert res["target_met"] is False
    assert res["curation"]["removed_share"] == pytest.approx(0.6)
    # 600 tokens x 3.6e-3 device-seconds per token (the raw run's speed)
    assert res["curation"]["epoch_device_hours_saved"] == pytest.approx(600 * 1e-6)
    assert res["curation"]["epoch_usd_saved"] == pytest.approx(600 * 1e-6 * 2.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """clean_documents (300 raw documents), curriculum shards of 150 of them, a 512-token tokenizer."""
    d = tmp_path_factory.mktemp("ablation")
    raw = [{"id": f"r{i:03d}", "text": prose(i, 30 + i % 40), "source": "test", "metadata": "{}"} for i in range(300)]
    (d / "clean_documents").mkdir()
    pq.write_table(pa.Table.from_pylist(raw), d / "clean_documents" / "documents.parquet")
    scored = [{**r, "quality_score": (i % 10) / 10} for i, r in enumerate(raw) if i % 2 == 0]
    for r in scored:
        del r["metadata"]
    build_curriculum(
        [str(write_jsonl(d / "scored.jsonl", scored))],
        d / "curriculum_shards",
        CurriculumConfig(target_shard_bytes=4000),
    )
    train_tokenizer(d / "curriculum_shards", d / "tokenizer", TokenizerConfig(vocab_size=512))
    return d


def test_the_heldout_set_is_shared_and_disjoint_from_the_three_inputs(corpus, tmp_path):
    raw = pq.read_table(corpus / "clean_documents" / "documents.parquet").to_pylist()
    curated = read_curated(corpus / "curriculum_shards")
    fraction = 0.2
    held_id = next(r["id"] for r in curated if is_validation(r["id"], fraction))
    # a raw document (odd ids are never curated) that near-dedup clustered with a held-out document
    mate = next(r["id"] for r in raw if int(r["id"][1:]) % 2 and not is_validation(r["id"], fraction))
    clusters = {held_id: 7, mate: 7}
    inputs = split_inputs(raw, curated, fraction, data_seed=0, clusters=clusters)

    held = {r["id"] for r in inputs.heldout}
    curated_ids = {r["id"] for r in curated}
    assert held and held == {i for i in curated_ids if is_validation(i, fraction)}
    for run in RUNS:
        ids = [r["id"] for r in inputs.runs[run]]
        assert not held & set(ids) and not any(is_validation(i, fraction) for i in ids)
        assert len(ids) == len(set(ids))
    assert mate not in {r["id"] for r in inputs.runs["raw"]}  # the near-copy of a held-out document is out
    # (a) is raw minus what is excluded; (b) and (c) the same curated documents in different orders
    expected_raw = {r["id"] for r in raw} - held - {mate} - {r["id"] for r in raw if is_validation(r["id"], fraction)}
    assert {r["id"] for r in inputs.runs["raw"]} == expected_raw
    b, c = [r["id"] for r in inputs.runs["curated_shuffled"]], [r["id"] for r in inputs.runs["curated_curriculum"]]
    assert set(b) == set(c) == curated_ids - held
    assert c == [r["id"] for r in curated if r["id"] not in held]  # curriculum order kept
    assert b != c and [r["id"] for r in inputs.runs["raw"]] != sorted(expected_raw)
    buckets = [r["bucket"] for r in inputs.runs["curated_curriculum"]]
    assert buckets == sorted(buckets) and len(set(buckets)) > 1
    assert inputs.schedules == {"raw": [0], "curated_shuffled": [0], "curated_curriculum": sorted(set(buckets))}
    assert split_inputs(raw, curated, fraction, 0, clusters).runs == inputs.runs  # deterministic
    assert split_inputs(raw, curated, fraction, 1, clusters).runs["curated_shuffled"] != inputs.runs["curated_shuffled"]

    # the written shards read back in the same order, the held-out set as its own bucket
    write_shards(inputs.runs["curated_curriculum"], inputs.heldout, tmp_path / "c", target_shard_bytes=3000)
    reader = ShardReader(tmp_path / "c")
    assert reader.buckets() == [*sorted(set(buckets)), HELDOUT_BUCKET] and len(reader.manifest["shards"]) > 1
    assert [i for b in sorted(set(buckets)) for i, _ in reader.documents(b)] == c
    assert [i for i, _ in reader.documents(HELDOUT_BUCKET)] == [r["id"] for r in inputs.heldout]


def test_config_refuses_unknown_keys_and_bad_budgets(corpus, tmp_path):
    base = {
        "clean_documents": str(corpus / "clean_documents" / "documents.parquet"),
        "curriculum_shards": str(corpus / "curriculum_shards"),
        "tokenizer_path": str(corpus / "tokenizer" / "tokenizer.json"),
        "near_duplicate_clusters": None,
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps({**base, "tokenz": 5}))
    with pytest.raises(ValueError, match=r"unknown field.*tokenz"):
        AblationConfig.from_file(path)
    with pytest.raises(ValueError, match="multiple of batch_size x seq_len"):
        AblationConfig.from_dict({**base, "tokens": 1000}).check()
    with pytest.raises(ValueError, match="not found"):
        AblationConfig.from_dict({**base, "near_duplicate_clusters": str(tmp_path / "none.parquet")}).check()
    from training.ablation import main

    assert main(["--config", str(path)]) == 2


def tiny_config(corpus: Path, out_dir: Path) -> AblationConfig:
    return AblationConfig(
        clean_documents=str(corpus / "clean_documents" / "documents.parquet"),
        curriculum_shards=str(corpus / "curriculum_shards"),
        tokenizer_path=str(corpus / "tokenizer" / "tokenizer.json"),
        near_duplicate_clusters=None,
        out_dir=str(out_dir),
        tokens=4096, seq_len=32, batch_size=8, eval_every_tokens=1024, warmup_tokens=512,
        heldout_fraction=0.2, heldout_tokens=1024, threads=1,
    )  # fmt: skip


def test_a_tiny_ablation_runs_end_to_end_and_repeats(corpus, tmp_path):
    lines: list[str] = []
    res = run_ablation(tiny_config(corpus, tmp_path / "one"), progress=lines.append)
    assert sum(line.startswith("run ") for line in lines) == 3
    saved = json.loads((tmp_path / "one" / RESULTS_FILE).read_text())
    assert (tmp_path / "one" / "heldout_loss.png").stat().st_size > 0
    table = (tmp_path / "one" / "results.md").read_text()
    for run in RUNS:
        curve = saved["runs"][run]["curve"]
        assert [t for t, _ in curve] == [1024, 2048, 3072, 4096]
        assert curve[-1][1] < curve[0][1] < 7.0  # learning, below ln(512) = 6.24 + noise
    raw = saved["runs"]["raw"]
    assert saved["target_heldout_loss"] == raw["final_heldout_loss"] == raw["curve"][-1][1]
    assert saved["to_target"]["raw"]["reached"] and saved["to_target"]["raw"]["tokens"] <= 4096
    raw_tokens = saved["to_target"]["raw"]["tokens"]
    for run in RUNS:  # tokens to (a)'s final loss: what the curve says, interpolated, never extrapolated
        t, expected = (
            saved["to_target"][run],
            tokens_to_target(saved["runs"][run]["curve"], saved["target_heldout_loss"]),
        )
        assert t["reached"] == (expected is not None)
        if expected is None:
            assert t["tokens"] is None and f"| {saved['runs'][run]['label']} |" in table
            assert table.split(f"| {saved['runs'][run]['label']} |")[1].split("\n")[0].count("not reached") == 2
        else:
            assert t["tokens"] == pytest.approx(expected) and t["share_of_raw_tokens"] == pytest.approx(
                expected / raw_tokens
            )
            assert f"| {expected:,.0f} |" in table
    assert 0.4 < saved["curation"]["removed_share"] < 0.6  # half the documents were curated away
    assert saved["heldout"]["tokens_evaluated"] == 1024 // 33 * 32
    # the three runs evaluate on identical rows
    rows = [run_validation_rows(Path(d)) for d in saved["run_dirs"].values()]
    assert all(list(r) == [HELDOUT_BUCKET] and torch.equal(r[HELDOUT_BUCKET], rows[0][HELDOUT_BUCKET]) for r in rows)
    assert all(Path(w).exists() for w in saved["wandb_runs"].values())

    again = run_ablation(tiny_config(corpus, tmp_path / "two"), progress=lambda _: None)
    for run in RUNS:
        first, second = res["runs"][run]["curve"], again["runs"][run]["curve"]
        assert [t for t, _ in first] == [t for t, _ in second]
        assert [v for _, v in second] == pytest.approx([v for _, v in first], abs=1e-4)
