"""The assets' run config is derived from the stage dataclasses: the same fields, defaults and docstrings."""

import dataclasses

import dagster as dg
import pytest

from assets.config import attribute_docs, stage_config, to_stage
from assets.curation import CleanDocumentsConfig, NearDedupDocumentsConfig, RawDocumentsConfig
from assets.quality import (
    CurriculumShardsConfig,
    FilteredDocumentsConfig,
    QualityClassifierConfig,
    ScoredDocumentsConfig,
)
from assets.training import TRAIN_FIELDS, TrainAssetConfig
from pipelines.clean import CleanConfig
from pipelines.curriculum import CurriculumConfig
from pipelines.filters import FILTER_NAMES, FilterConfig
from pipelines.near_dedup import NearDedupConfig
from pipelines.quality import QualityModelConfig
from pipelines.quality_score import ScoreConfig
from pipelines.readers import ReaderConfig
from training.config import PRESETS, TrainConfig

DERIVED = [
    (RawDocumentsConfig, ReaderConfig),
    (CleanDocumentsConfig, CleanConfig),
    (NearDedupDocumentsConfig, NearDedupConfig),
    (FilteredDocumentsConfig, FilterConfig),
    (ScoredDocumentsConfig, ScoreConfig),
    (CurriculumShardsConfig, CurriculumConfig),
    (QualityClassifierConfig, QualityModelConfig),
]


@pytest.mark.parametrize(("config_cls", "stage_cls"), DERIVED, ids=[c.__name__ for c, _ in DERIVED])
def test_default_run_config_is_the_stage_default(config_cls, stage_cls):
    """No drift: the asset's defaults give exactly the stage's defaults (workers included), and each field keeps the
    stage field's docstring for the Launchpad."""
    assert to_stage(config_cls(), stage_cls) == stage_cls()
    docs = attribute_docs(stage_cls)
    for name, field in config_cls.model_fields.items():
        if name in docs:
            assert field.description == docs[name], name


def test_run_config_values_reach_the_stage_with_its_types():
    config = CleanDocumentsConfig(workers=1, redact_pii=["email"])
    assert to_stage(config, CleanConfig) == CleanConfig(workers=1, redact_pii=("email",))  # a list back to a tuple
    overrides = {"gopher_quality": {"min_doc_words": 20}}
    filters = FilteredDocumentsConfig(languages=["en", "de"], filter_overrides=overrides)
    stage = to_stage(filters, FilterConfig)
    assert stage.languages == ("en", "de") and stage.gopher_quality == {}  # overrides are merged by the asset
    assert not set(FILTER_NAMES) & set(FilteredDocumentsConfig.model_fields)  # the filters' dicts: filter_overrides


def test_training_run_config_takes_train_configs_fields_and_presets():
    defaults = TrainConfig()
    for name in TRAIN_FIELDS:
        assert TrainAssetConfig.model_fields[name].get_default(call_default_factory=True) == getattr(defaults, name)
    assert all(p in TrainAssetConfig.model_fields["preset"].description for p in PRESETS)


def test_a_derived_config_is_a_dagster_config_the_launchpad_can_show():
    @dataclasses.dataclass(kw_only=True)
    class Stage:
        """A stage."""

        names: tuple[str, ...] = ("a",)
        """Names."""
        limits: dict | None = None
        """Per name, a limit."""

    Config = stage_config(Stage, "StageConfig")

    @dg.asset
    def staged(config: Config) -> dict:
        return dataclasses.asdict(to_stage(config, Stage))

    result = dg.materialize([staged], run_config={"ops": {"staged": {"config": {"limits": {"a": {"max": 3}}}}}})
    assert result.output_for_node("staged") == {"names": ("a",), "limits": {"a": {"max": 3}}}
    assert Config.model_fields["names"].description == "Names." and Config.__doc__ == "A stage."
