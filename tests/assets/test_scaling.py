"""dense_scaling on the session's tiny models: a target outside the sizes' losses is reported, never extrapolated;
inside them the equal-quality dense model is trained, and the study shows in the metadata and W&B."""

import json
import math

import dagster as dg
import pytest

from tests.assets.conftest import metadata_of

pytestmark = pytest.mark.slow


def test_a_target_no_size_reaches_is_a_warning_naming_the_range_not_a_failure(scaled):
    # evidence never blocks: the asset materializes, its WARN check says what was covered and what would establish it
    assert scaled.missed.success
    [check] = scaled.missed.get_asset_check_evaluations()
    assert check.check_name == "equal_quality_established" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN
    low, high = scaled.results["covered_loss"]
    assert f"held-out losses {low:.4f} to {high:.4f}, which do not bracket" in check.description
    assert "nothing is extrapolated" in check.description
    assert "larger sizes than d_ff 512" in check.metadata["to_establish"].value  # the target is below every loss
    meta = metadata_of(scaled.missed, "dense_scaling")
    assert meta["equal_quality"].value == "not established" and "data:image/png;base64," in meta["scaling"].value


def test_inside_the_range_the_equal_quality_dense_model_is_trained_and_fitted(scaled, trained):
    r = scaled.results
    assert r["bracketed"] and r["moe"]["val_loss"] == scaled.target
    assert [p["d_ff"] for p in r["points"]] == [16, 512] and [p["seed"] for p in r["seeds"]] == [0, 1]
    assert r["seed_noise"] == pytest.approx(abs(r["seeds"][0]["val_loss"] - r["seeds"][1]["val_loss"]) / math.sqrt(2))
    eq = r["equal_quality"]
    # the fit's size for the target, rounded to a width of 64s, trained like the MoE (same tokens, seed)
    assert eq["d_ff"] % 64 == 0 and eq["tokens"] == r["points"][0]["tokens"] and eq["seed"] == 0
    assert eq["matched"] == (abs(eq["val_loss"] - scaled.target) <= r["tolerance"])
    assert eq["matched"] or eq["bracket"] is not None
    moe_summary = json.loads((trained.data_dir / "moe_model" / "summary.json").read_text())
    assert eq["tokens"] == moe_summary["tokens"]
    train_config = json.loads((trained.data_dir / "dense_scaling" / "runs" / "equal_quality_dense" /
                               "train_config.json").read_text())  # fmt: skip
    moe_config = json.loads((trained.data_dir / "moe_model" / "train_config.json").read_text())
    assert train_config["model"]["n_routed_experts"] == 0 and train_config["model"]["d_ff"] == eq["d_ff"]
    for key in ("max_steps", "lr", "min_lr", "warmup_steps", "data", "seed", "shard_dir"):
        assert train_config[key] == moe_config[key], key
    meta = metadata_of(scaled.result, "dense_scaling")
    assert "data:image/png;base64," in meta["scaling"].value and "| equal_quality_dense |" in meta["table"].value
    assert meta["multiplier"].value == eq["multiplier"] and "wandb_run" in meta
    # the sizes of the failed first study were reused, not trained again
    logs = [e.user_message for e in trained.instance.all_logs(scaled.result.run_id)]
    assert any(m.startswith("dense_dff16: ") and m.endswith("(reused)") for m in logs)
