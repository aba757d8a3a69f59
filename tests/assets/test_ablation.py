"""The data_ablation asset: three tiny DeepSpeed runs, reported as a table, a plot and W&B runs."""

import json
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.ablation import data_ablation
from assets.resources import CurationPaths, WandbResource
from model.tokenizer import TokenizerConfig, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.ablation import tokens_to_target

pytestmark = pytest.mark.slow  # DeepSpeed trainings

TINY = {
    "tokens": 2048, "seq_len": 32, "batch_size": 8, "eval_every_tokens": 1024, "warmup_tokens": 256,
    "heldout_fraction": 0.2, "heldout_tokens": 1024, "threads": 1,
    "arms": ["raw", "curated_cosine", "curated_wsd_anneal"],
}  # fmt: skip


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """What clean_documents (one drop), curriculum_shards and tokenizer leave under the data folder."""
    data = tmp_path / "data"
    raw = [{"id": f"r{i:03d}", "text": prose(i, 30 + i % 40), "source": "t", "metadata": "{}"} for i in range(200)]
    drop = data / "clean_documents" / "partitions" / "sample"
    drop.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(raw), drop / "documents.parquet")
    scored = [{"id": r["id"], "text": r["text"], "quality_score": (i % 10) / 10} for i, r in enumerate(raw) if i % 3]
    src = write_jsonl(tmp_path / "scored.jsonl", scored)
    build_curriculum([str(src)], data / "curriculum_shards", CurriculumConfig(target_shard_bytes=8000))
    train_tokenizer(data / "curriculum_shards", data / "tokenizer", TokenizerConfig(vocab_size=512))
    return data


def materialize(data_dir: Path, config: dict):
    return dg.materialize(
        [data_ablation],
        resources={
            "paths": CurationPaths(data_dir=str(data_dir)),
            "wandb": WandbResource(mode="offline", dir=str(data_dir.parent)),
        },
        run_config={"ops": {"data_ablation": {"config": config}}},
        raise_on_error=False,
    )


def test_the_ablation_asset_reports_curves_and_tokens_to_target(data_dir):
    result = materialize(data_dir, TINY)
    assert result.success
    [event] = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    table = meta["table"].value
    assert table.count("\n") == 4 and "(a) raw" in table and "(d) curated, WSD + quality anneal" in table
    assert "(d) - (b)" in meta["paired"].value and meta["best"].value in ("curated_cosine", "curated_wsd_anneal")
    assert meta["target/beats_random_cosine"].value is False  # one seed: no spread to beat
    assert meta["heldout_loss"].value.startswith("![held-out loss against tokens](data:image/png;base64,")
    assert meta["raw/tokens_to_target"].value <= 2048  # (a) reaches its own final loss
    results = json.loads((data_dir / "data_ablation" / "results.json").read_text())
    for run in TINY["arms"]:  # what the curves say, never extrapolated
        expected = tokens_to_target(results["runs"][run]["curve"], results["target_heldout_loss"])
        value = meta[f"{run}/tokens_to_target"].value
        assert value == "not reached" if expected is None else value == pytest.approx(expected)
    assert 0.2 < meta["removed_token_share"].value < 0.5  # a third of the documents were curated away
    runs = meta["wandb_runs"].value
    assert len(runs) == 4 and all(Path(p).exists() for p in runs.values())  # three trainings + the summary
    assert meta["wandb_group"].value.startswith("data-ablation-")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokens": 1000}, "multiple of batch_size x seq_len"),
        ({"decay_fraction": 1.0}, "decay_fraction=1.0 must be in (0, 1)"),
        ({"arms": ["curated_wsd", "sorted"]}, "must be distinct arms of"),
    ],
)
def test_bad_config_fails_before_any_training(data_dir, changes, message):
    result = materialize(data_dir, {**TINY, **changes})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert message in str(failure.event_specific_data.error)
    assert not (data_dir / "data_ablation" / "runs").exists()
