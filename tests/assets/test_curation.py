"""The curation assets materialized by Dagster on a small corpus: outputs, metadata, checks, W&B."""

import json
import subprocess
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.checks import CHECKS
from assets.curation import clean_documents, document_ledger, near_dedup_documents, raw_documents
from assets.resources import CurationPaths, WandbResource
from tests.conftest import prose, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ASSETS = [raw_documents, clean_documents, near_dedup_documents, document_ledger]


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


def materialize(tmp_path: Path, run_config: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *CHECKS],
        resources={
            "paths": CurationPaths(data_dir=str(tmp_path / "data")),
            "wandb": WandbResource(mode="offline", dir=str(tmp_path)),
        },
        run_config=run_config,
    )


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return event.materialization.metadata


def test_curation_graph_materializes_balances_and_passes_checks(tmp_path):
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
    assert "| d0 | test |" in raw["preview"].value

    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(checks) == len(CHECKS)
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}

    ledger = pq.read_table(tmp_path / "data" / "document_ledger" / "ledger.parquet").to_pylist()
    assert len(ledger) == 34 + 32 + 31
    reasons = {(r["id"], r["stage"]): r["reason"] for r in ledger if r["outcome"] == "dropped"}
    assert reasons[("copy", "clean_documents")] == "exact_duplicate"
    assert reasons[("d4", "near_dedup_documents")].startswith("near_duplicate:")

    run_dir = Path(near["wandb_run"].value)
    logged = wandb_summary(run_dir)
    assert logged["near_dedup_documents/n_in"] == 31 and logged["near_dedup_documents/dropped/near_duplicate"] == 1


def wandb_summary(run_dir: Path) -> dict:
    """The run's summary as W&B recorded it, read back from the offline transaction log."""
    [log] = run_dir.glob("*.wandb")
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "wandb"), "leet", "inspect", "--summary", "--json", str(log)],
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
    assert checks["ledger_balances"].passed


def test_missing_input_fails_the_run_naming_the_path(tmp_path):
    with pytest.raises(Exception, match=r"nowhere\.jsonl"):
        materialize(tmp_path, {"ops": {"raw_documents": {"config": {"inputs": [str(tmp_path / "nowhere.jsonl")]}}}})
