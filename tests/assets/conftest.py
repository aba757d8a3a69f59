"""Fixtures of the asset tests: a data folder with shards and a tokenizer, the materialize helper, and the three
tiny models trained once per session (the inference assets' tests build on them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from assets.resources import CurationPaths, WandbResource
from assets.scaling import SCALING_CHECKS, dense_scaling
from assets.training import TRAINING_CHECKS, dense_baseline_model, draft_model, moe_model
from model.tokenizer import TokenizerConfig, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl

TINY = {"preset": "debug_tiny", "max_steps": 16, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_every": 8}
"""The training assets' config in tests: 16 steps of debug_tiny."""
TINY_DRAFT = {**TINY, "preset": "debug_tiny_draft"}


def make_data_dir(tmp_path: Path) -> Path:
    """What curriculum_shards and tokenizer leave under the data folder."""
    data = tmp_path / "data"
    rows = [{"id": f"d{i:03d}", "text": prose(i % 37, 40 + i % 50), "quality_score": (i % 10) / 10} for i in range(200)]
    src = write_jsonl(tmp_path / "scored.jsonl", rows)
    build_curriculum([str(src)], data / "curriculum_shards", CurriculumConfig(target_shard_bytes=8000))
    train_tokenizer(data / "curriculum_shards", data / "tokenizer", TokenizerConfig(vocab_size=512))
    return data


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return make_data_dir(tmp_path)


def materialize(
    data_dir: Path, assets: list, config: dict, raise_on_error: bool = True, instance=None, checks=(), configs=None
) -> dg.ExecuteInProcessResult:
    """configs: a config per asset, where it differs from `config`."""
    configs = configs or {}
    return dg.materialize(
        [*assets, *checks],
        instance=instance,
        resources={
            "paths": CurationPaths(data_dir=str(data_dir)),
            "wandb": WandbResource(mode="offline", dir=str(data_dir.parent)),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
        run_config={"ops": {a.key.to_user_string(): {"config": configs.get(a, config)} for a in assets}},
        raise_on_error=raise_on_error,
    )


def metadata_of(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return event.materialization.metadata


@dataclass
class Trained:
    """moe_model, dense_baseline_model and draft_model materialized (with their reload checks) in `instance`."""

    data_dir: Path
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    data = make_data_dir(tmp_path_factory.mktemp("trained"))
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(
        data,
        [moe_model, dense_baseline_model, draft_model],
        TINY,
        instance=instance,
        checks=TRAINING_CHECKS[1:],  # the exported model, reloaded, reproduces the reported validation loss
        configs={draft_model: TINY_DRAFT},
    )
    return Trained(data, instance, result)


SCALING = {"d_ff": [16, 512], "noise_size": 0, "noise_seeds": [1]}
"""dense_scaling in tests: two sizes around the tiny MoE, a second seed at the smaller one."""


@dataclass
class Scaled:
    """dense_scaling materialized twice on the session's models: first with a target loss no size reaches (the
    study is recorded, its WARN check fails, the asset does not), then with a target between the two sizes'
    losses (the study's runs are reused and equal_quality_dense is trained)."""

    missed: dg.ExecuteInProcessResult
    result: dg.ExecuteInProcessResult
    results: dict
    target: float


@pytest.fixture(scope="session")
def scaled(trained) -> Scaled:
    results_file = trained.data_dir / "dense_scaling" / "results.json"
    missed = materialize(trained.data_dir, [dense_scaling], {**SCALING, "target_loss": 0.5}, instance=trained.instance,
                         checks=SCALING_CHECKS)  # fmt: skip
    low, high = json.loads(results_file.read_text())["covered_loss"]
    target = (low + high) / 2
    result = materialize(
        trained.data_dir, [dense_scaling], {**SCALING, "target_loss": target}, instance=trained.instance
    )
    return Scaled(missed, result, json.loads(results_file.read_text()), target)
