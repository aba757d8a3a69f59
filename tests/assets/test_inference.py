"""The quantized_model asset's refusals (its end-to-end run, on trained models, is in test_training.py)."""

import dagster as dg
import pytest

from assets.inference import quantized_model
from assets.resources import CurationPaths, WandbResource


def run(tmp_path, config: dict):
    return dg.materialize(
        [quantized_model],
        resources={
            "paths": CurationPaths(data_dir=str(tmp_path / "data")),
            "wandb": WandbResource(mode="disabled"),
        },
        run_config={"ops": {"quantized_model": {"config": config}}},
        raise_on_error=False,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"group_size": 48}, "unsupported INT4 group size 48"),
        ({}, "moe_model/model.safetensors: missing: materialize moe_model first"),
    ],
)
def test_bad_config_or_missing_models_fail_before_any_work(tmp_path, config, message):
    result = run(tmp_path, config)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert message in failure.event_specific_data.error.message
