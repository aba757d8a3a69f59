"""The Frugal Definitions: `dagster dev -m assets.definitions` (or `make ui`) loads these."""

from __future__ import annotations

import os

import dagster as dg

from assets.ablation import data_ablation
from assets.checks import CHECKS
from assets.drops import DropLocation
from assets.inference import (
    EXPORT_CHECKS,
    INFERENCE_CHECKS,
    benchmark_report,
    exported_model,
    inference_package,
    quantized_model,
)
from assets.ledger import CURATION_ASSETS, document_ledger
from assets.quality import quality_classifier
from assets.resources import CurationPaths, WandbResource
from assets.scaling import SCALING_CHECKS, dense_scaling
from assets.sensors import SENSORS
from assets.training import TRAINING_CHECKS, TRAINING_TAGS, dense_baseline_model, draft_model, moe_model, tokenizer

DATA_DIR = os.environ.get("FRUGAL_DATA_DIR", "data")

# One job per stage of the project, so that runs carry a name and the Timeline groups them.
curation_job = dg.define_asset_job(
    "curation",
    selection=dg.AssetSelection.groups("curation") - dg.AssetSelection.assets(quality_classifier),
    description="Curate one input drop: raw documents to the curriculum shards and the ledger of every drop.",
)
training_job = dg.define_asset_job(
    "training",
    selection=dg.AssetSelection.assets(quality_classifier) | dg.AssetSelection.groups("training"),
    description="Train the quality classifier, the tokenizer and the models on the curriculum shards.",
)
release_job = dg.define_asset_job(
    "release",
    selection=dg.AssetSelection.groups("inference", "evaluation") - dg.AssetSelection.assets(data_ablation),
    description="Quantize, export, benchmark against the equal-quality dense model, and publish the package.",
)

# Who answers for each group of assets, and the stage tag the catalog filters by.
OWNERS = {"curation": "team:data", "training": "team:training", "inference": "team:inference",
          "evaluation": "team:inference"}  # fmt: skip


def _owned(spec: dg.AssetSpec) -> dg.AssetSpec:
    return spec.replace_attributes(owners=[OWNERS[spec.group_name]], tags={**spec.tags, "stage": spec.group_name})


defs = dg.Definitions(
    assets=dg.map_asset_specs(
        _owned,
        [
            *CURATION_ASSETS,
            quality_classifier,
            document_ledger,
            tokenizer,
            moe_model,
            dense_baseline_model,
            draft_model,
            quantized_model,
            benchmark_report,
            inference_package,
            exported_model,
            data_ablation,
            dense_scaling,
        ],
    ),
    asset_checks=[*CHECKS, *TRAINING_CHECKS, *INFERENCE_CHECKS, *EXPORT_CHECKS, *SCALING_CHECKS],
    jobs=[curation_job, training_job, release_job],
    sensors=SENSORS,
    # Steps run in parallel processes, but only one training run at a time: each one uses every core. The processes
    # fork from a server that has imported these definitions once (torch and dagster included), instead of each
    # importing them afresh: a curation run of 23 steps takes 35 s instead of 80 s on 2 cores.
    executor=dg.multiprocess_executor.configured(
        {
            "tag_concurrency_limits": [{"key": k, "value": v, "limit": 1} for k, v in TRAINING_TAGS.items()],
            "start_method": {"forkserver": {"preload_modules": ["assets.definitions"]}},
        }
    ),
    resources={
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "paths": CurationPaths(data_dir=DATA_DIR),
        "drops": DropLocation(url=os.environ.get("FRUGAL_DROPS_URL", ""), data_dir=DATA_DIR),
        "wandb": WandbResource(
            project=os.environ.get("WANDB_PROJECT", "frugal"),
            mode=os.environ.get("FRUGAL_WANDB_MODE", "auto"),
            dir=os.environ.get("WANDB_DIR", "."),
        ),
    },
)
