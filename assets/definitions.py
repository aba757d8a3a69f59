"""The Frugal Definitions: `dagster dev -m assets.definitions` (or `make ui`) loads these."""

from __future__ import annotations

import os

import dagster as dg

from assets.ablation import data_ablation
from assets.checks import CHECKS
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
from assets.scaling import dense_scaling
from assets.training import TRAINING_CHECKS, TRAINING_TAGS, dense_baseline_model, draft_model, moe_model, tokenizer

curation_job = dg.define_asset_job("curation", selection=dg.AssetSelection.groups("curation"))

defs = dg.Definitions(
    assets=[
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
    asset_checks=[*CHECKS, *TRAINING_CHECKS, *INFERENCE_CHECKS, *EXPORT_CHECKS],
    jobs=[curation_job],
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
        "paths": CurationPaths(data_dir=os.environ.get("FRUGAL_DATA_DIR", "data")),
        "wandb": WandbResource(
            project=os.environ.get("WANDB_PROJECT", "frugal"),
            mode=os.environ.get("FRUGAL_WANDB_MODE", "auto"),
            dir=os.environ.get("WANDB_DIR", "."),
        ),
    },
)
