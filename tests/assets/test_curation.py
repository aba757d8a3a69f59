"""The curation assets materialized by Dagster on a small corpus: outputs, metadata, checks, W&B."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.checks import CHECKS
from assets.curation import clean_documents, near_dedup_documents, raw_documents
from assets.drops import DROPS, DropLocation
from assets.ledger import CURATION_ASSETS, CURATION_STAGES, document_ledger
from assets.quality import quality_classifier
from assets.resources import CurationPaths, WandbResource
from assets.training import tokenizer, tokenizer_round_trips
from tests.conftest import prose, write_jsonl

FIRST_HALF = [raw_documents, clean_documents, near_dedup_documents]
ALL_ASSETS = [*CURATION_ASSETS, quality_classifier, document_ledger, tokenizer]


def checks_for(assets) -> list:
    keys = {a.key for a in assets}
    return [c for c in [*CHECKS, tokenizer_round_trips] if all(k.asset_key in keys for k in c.check_keys)]


def corpus(tmp_path: Path) -> Path:
    rows = []
    for i in range(30):
        rows.append({"id": f"d{i}", "text": prose(i, 120), "source": "test"})
    rows += [
        {"id": "copy", "text": "  " + prose(3, 120) + "\n"},  # exact duplicate after cleaning
        {"id": "near", "text": prose(4, 120) + " read more on our site"},  # near-duplicate
        '{"id": "broken"',  # malformed
        {"id": "blank", "text": "   "},  # empty
    ]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


DROP = "test"
"""The drop (partition) the tests curate."""


def materialize(
    tmp_path: Path, run_config: dict, assets=FIRST_HALF, raise_on_error=True, drop=DROP, instance=None
) -> dg.ExecuteInProcessResult:
    """Materialize `assets` for input drop `drop` (added to `instance`, an ephemeral one by default)."""
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DROPS.name, [drop])
    return dg.materialize(
        [*assets, *checks_for(assets)],
        raise_on_error=raise_on_error,
        instance=instance,
        partition_key=drop,
        resources={
            "paths": CurationPaths(data_dir=str(tmp_path / "data")),
            "wandb": WandbResource(mode="offline", dir=str(tmp_path)),
            "drops": DropLocation(url=str(tmp_path / "drops")),
        },
        run_config=run_config,
    )


def drop_dir(tmp_path: Path, asset: str, drop: str = DROP) -> Path:
    return tmp_path / "data" / asset / "partitions" / drop


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return event.materialization.metadata


def test_first_half_materializes_and_passes_checks(tmp_path):
    src = corpus(tmp_path)
    result = materialize(
        tmp_path,
        {
            "ops": {
                "raw_documents": {"config": {"inputs": [str(src)]}},
                "clean_documents": {"config": {"workers": 1}},
                "near_dedup_documents": {"config": {"workers": 1}},
            }
        },
    )
    assert result.success
    raw, clean, near = (metadata_of(result, a) for a in ("raw_documents", "clean_documents", "near_dedup_documents"))
    assert (raw["n_in"].value, raw["n_kept"].value) == (34, 32)
    assert "malformed" in raw["drop_reasons"].value and "empty" in raw["drop_reasons"].value
    assert (clean["n_in"].value, clean["n_kept"].value) == (32, 31)
    assert (near["n_in"].value, near["n_kept"].value) == (31, 30)
    assert "data:image/png;base64," in near["cluster_size_histogram"].value
    assert raw["preview"].value.records[0].data == {"id": "d0", "source": "test", "text": prose(0, 120)[:160]}

    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(checks) == len(checks_for(FIRST_HALF)) == 10
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}

    clean_ledger = pq.read_table(drop_dir(tmp_path, "clean_documents") / "ledger.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in clean_ledger}["copy"] == "exact_duplicate"
    near_ledger = pq.read_table(drop_dir(tmp_path, "near_dedup_documents") / "ledger.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in near_ledger}["d4"].startswith("near_duplicate:")

    run_dir = Path(near["wandb_run"].value)
    logged = wandb_summary(run_dir)
    assert logged["near_dedup_documents/n_in"] == 31 and logged["near_dedup_documents/dropped/near_duplicate"] == 1


def wandb_summary(run_dir: Path) -> dict:
    """The run's summary as W&B recorded it, read back from the offline transaction log."""
    [log] = run_dir.glob("*.wandb")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["summary"]


def test_failed_check_on_near_duplicate_bounds(tmp_path):
    src = corpus(tmp_path)
    result = materialize(
        tmp_path,
        {
            "ops": {
                "raw_documents": {"config": {"inputs": [str(src)]}},
                "near_dedup_documents_near_duplicate_rate_in_bounds": {"config": {"min_rate": 0.5}},
            }
        },
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["near_duplicate_rate_in_bounds"].passed
    assert checks["near_duplicate_rate_in_bounds"].metadata["near_duplicate_rate"].value == pytest.approx(1 / 31)
    assert checks["unique_ids"].passed


def test_a_stage_that_drops_more_than_its_limit_warns_with_its_reasons(tmp_path):
    src = corpus(tmp_path)
    limit = {"config": {"max_drop_share": 0.02}}  # near-dedup drops 1 of 31 (3%)
    run_config = {
        "raw_documents": {"config": {"inputs": [str(src)]}},
        "near_dedup_documents_drop_share_below_limit": limit,
    }
    result = materialize(tmp_path, {"ops": run_config})
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    warning = checks[("near_dedup_documents", "drop_share_below_limit")]
    assert not warning.passed and warning.severity == dg.AssetCheckSeverity.WARN
    assert warning.metadata["drop_share"].value == pytest.approx(1 / 31)
    [row] = [line for line in warning.metadata["top_reasons"].value.splitlines() if "near_duplicate:" in line]
    assert "| 1 |" in row and "d4" in row  # the reason, its count and an example id
    assert "over the limit of 2%" in warning.description and "near_duplicate:" in warning.description
    raw_share = checks[("raw_documents", "drop_share_below_limit")]  # 2 of 34 at the default limit of 50%
    assert raw_share.passed and raw_share.metadata["n_dropped"].value == 2


def test_missing_input_fails_the_run_naming_the_path(tmp_path):
    with pytest.raises(Exception, match=r"nowhere\.jsonl"):
        materialize(tmp_path, {"ops": {"raw_documents": {"config": {"inputs": [str(tmp_path / "nowhere.jsonl")]}}}})


@pytest.mark.slow
def test_whole_graph_on_the_sample_corpus(tmp_path):
    """Sample corpus -> shards: every asset and check, the ledger balancing from raw to shards."""
    result = materialize(
        tmp_path,
        {
            "ops": {
                "raw_documents": {"config": {"sample_documents": 300}},
                "quality_classifier": {"config": {"epoch": 10, "measure_transfer": False, "max_per_domain": 150}},
                "curriculum_shards": {"config": {"target_shard_bytes": 50_000}},
                "tokenizer": {"config": {"vocab_size": 1000}},
            }
        },
        assets=ALL_ASSETS,
        drop="sample",  # the drop of the embedded sample corpus
    )
    assert result.success
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(checks) == len(CHECKS) + 1
    failed = {k: c.metadata for k, c in checks.items() if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR}
    assert not failed, failed
    shares = {a: checks[(a, "drop_share_below_limit")].metadata["drop_share"].value for a in CURATION_STAGES}
    assert shares["raw_documents"] == 0.0 and 0 < shares["near_dedup_documents"] < 0.5

    data = tmp_path / "data"
    ledger = pq.read_table(data / "document_ledger" / "ledger.parquet").to_pylist()
    stages = [a.key.to_user_string() for a in CURATION_ASSETS]
    per_stage = {s: [r for r in ledger if r["stage"] == s] for s in stages}
    assert len(per_stage["raw_documents"]) == 300
    for before, after in itertools.pairwise(stages):  # each stage's input is the previous one's kept documents
        assert {r["id"] for r in per_stage[after]} == {r["id"] for r in per_stage[before] if r["outcome"] == "kept"}
    reasons = {r["reason"].split(":")[0] for r in ledger if r["outcome"] == "dropped"}
    assert {"exact_duplicate", "near_duplicate", "heuristic", "low_quality"} <= reasons

    manifest = json.loads((data / "curriculum_shards" / "manifest.json").read_text())
    n_final = sum(r["outcome"] == "kept" for r in per_stage["curriculum_shards"])
    assert manifest["n_rows"] == n_final == sum(s["rows"] for s in manifest["shards"]) and len(manifest["shards"]) > 1

    by_source = metadata_of(result, "document_ledger")["kept_by_source"].value
    assert "data:image/png;base64," in by_source
    share = {
        line.split("|")[1].strip(): line.split("|")[-2].strip() for line in by_source.splitlines()[2:] if "|" in line
    }
    assert int(share["synthetic-low-quality"].rstrip("%")) < int(share["python-docs"].rstrip("%"))
    scored = metadata_of(result, "scored_documents")
    assert "data:image/png;base64," in scored["score_by_source"].value
    classifier = metadata_of(result, "quality_classifier")
    assert 0.5 < classifier["roc_auc"].value <= 1.0
    assert metadata_of(result, "tokenizer")["vocab_size"].value == 1000
    buckets = [r.data for r in metadata_of(result, "curriculum_shards")["bucket_examples"].value.records]
    assert {(r["bucket"], r["end"]) for r in buckets} >= {("0", "top"), ("0", "bottom")}
    assert_markdown_is_the_projects_own(result)


def assert_markdown_is_the_projects_own(result: dg.ExecuteInProcessResult) -> None:
    """Every Markdown value in the run's metadata (assets and checks) embeds images only as data: PNGs and holds
    no raw HTML: corpus content, which may hold either, goes into text tables (assets/metadata.py)."""
    events = [e.materialization.metadata for e in result.get_asset_materialization_events()]
    events += [e.metadata for e in result.get_asset_check_evaluations()]
    for metadata in events:
        for key, value in metadata.items():
            if isinstance(value, dg.MarkdownMetadataValue):
                images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", value.value)
                assert all(src.startswith("data:image/png;base64,") for src in images), (key, images)
                assert not re.search(r"<\s*[a-zA-Z/!]", value.value), (key, value.value[:300])


EVIL = (
    "![PyPI version](https://badge.fury.io/py/frugal.svg) <img src=https://example.com/x.png> "
    "<script>alert(1)</script> [a link](https://example.com) **bold** | a | pipe"
)


def test_document_markup_is_shown_as_text_never_rendered(tmp_path):
    rows = [
        {"id": "evil", "text": EVIL + " " + prose(99, 60)},
        *({"id": f"d{i}", "text": prose(i, 60)} for i in range(6)),
    ]
    src = write_jsonl(tmp_path / "evil.jsonl", rows)
    result = materialize(tmp_path, {"ops": {"raw_documents": {"config": {"inputs": [str(src)]}}}})
    preview = metadata_of(result, "raw_documents")["preview"].value
    assert isinstance(preview, dg.TableMetadataValue)
    assert preview.records[0].data["text"] == (EVIL + " " + prose(99, 60))[:160]  # verbatim, markup and all
    assert_markdown_is_the_projects_own(result)


@pytest.mark.slow
def test_filters_that_drop_everything_stop_the_run(tmp_path):
    src = corpus(tmp_path)  # syllable soup: no language lid.176 is confident about
    result = materialize(
        tmp_path,
        {
            "ops": {
                "raw_documents": {"config": {"inputs": [str(src)]}},
                "quality_classifier": {"config": {"epoch": 5, "measure_transfer": False, "max_per_domain": 60}},
            }
        },
        assets=ALL_ASSETS,
        raise_on_error=False,
    )
    assert not result.success
    failures = {e.step_key: e for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    assert "dropped all 30 documents" in str(failures["filtered_documents"].event_specific_data.error)
    assert "quality_classifier" not in failures  # it never trains on the corpus, however little of it there is
    assert not (tmp_path / "data" / "curriculum_shards").exists()


def test_drops_in_turn_dedup_against_each_other_and_a_bad_drop_fails_alone(tmp_path):
    """Drop a, then a drop whose file is gone (its run fails, nothing of it is indexed), then drop b with copies of
    a's documents: b's ledger names the kept documents in drop a, and the ledger balances per drop."""
    instance = dg.DagsterInstance.ephemeral()
    (tmp_path / "drops").mkdir()
    write_jsonl(tmp_path / "drops" / "a.jsonl", [{"id": f"a{i}", "text": prose(i, 120)} for i in range(10)])
    copies = [{"id": "b_exact", "text": prose(2, 120)}, {"id": "b_near", "text": prose(3, 120) + " read more"}]
    write_jsonl(tmp_path / "drops" / "b.jsonl", [*copies, *({"id": f"b{i}", "text": prose(50 + i, 120)}
                                                            for i in range(5))])  # fmt: skip
    ops = {"clean_documents": {"config": {"workers": 1}}, "near_dedup_documents": {"config": {"workers": 1}}}
    assert materialize(tmp_path, {"ops": ops}, drop="a.jsonl", instance=instance).success
    failed = materialize(tmp_path, {"ops": ops}, drop="gone.jsonl", instance=instance, raise_on_error=False)
    assert not failed.success
    assert materialize(tmp_path, {"ops": ops}, drop="b.jsonl", instance=instance).success

    index = json.loads((tmp_path / "data" / "near_dedup_documents" / "index" / "index.json").read_text())
    assert [e["key"] for e in index["partitions"]] == ["a.jsonl", "b.jsonl"]
    clean_ledger = {r["id"]: r for r in pq.read_table(drop_dir(tmp_path, "clean_documents", "b.jsonl")
                                                       / "ledger.parquet").to_pylist()}  # fmt: skip
    assert (clean_ledger["b_exact"]["reason"], clean_ledger["b_exact"]["duplicate_partition"]) == (
        "exact_duplicate",
        "a.jsonl",
    )
    near = {r["id"]: r for r in pq.read_table(drop_dir(tmp_path, "near_dedup_documents", "b.jsonl")
                                              / "ledger.parquet").to_pylist()}  # fmt: skip
    assert near["b_near"]["duplicate_of"] == "a3" and near["b_near"]["duplicate_partition"] == "a.jsonl"
    assert set(instance.get_materialized_partitions(dg.AssetKey("near_dedup_documents"))) == {"a.jsonl", "b.jsonl"}
