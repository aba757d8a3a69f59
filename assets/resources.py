"""Resources: where curated data lives, and Weights & Biases tracking."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg

from pipelines.dedup_index import INDEX_DIR, PARTITIONS_DIR


class CurationPaths(dg.ConfigurableResource):
    """The folder under which each curation asset writes its own sub-folder. A partitioned asset writes one folder per
    input drop, `<asset>/partitions/<drop>/`, beside the dedup index that its drops share, `<asset>/index/`."""

    data_dir: str = "data"

    def stage_dir(self, asset_name: str) -> Path:
        path = Path(self.data_dir) / asset_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def partition_dir(self, asset_name: str, drop: str) -> Path:
        path = self.stage_dir(asset_name) / PARTITIONS_DIR / drop
        path.mkdir(parents=True, exist_ok=True)
        return path

    def index_dir(self, asset_name: str) -> Path:
        return self.stage_dir(asset_name) / INDEX_DIR

    def partition_files(self, asset_name: str, file: str, drops: Sequence[str]) -> list[Path]:
        """`file` of each of `drops` (in their order) that has been materialized."""
        folder = Path(self.data_dir) / asset_name / PARTITIONS_DIR
        return [folder / d / file for d in drops if (folder / d / file).exists()]


class WandbResource(dg.ConfigurableResource):
    """Logs each materialization as one W&B run, grouped by Dagster run.

    mode "auto" is online when WANDB_API_KEY is set and offline otherwise (runs then sit under
    `<dir>/wandb/` and can be uploaded later with `wandb sync` or read with `wandb leet`).
    """

    project: str = "frugal"
    entity: str | None = None
    mode: str = "auto"
    dir: str = "."

    def _mode(self) -> str:
        if self.mode == "auto":
            return "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"WandbResource.mode must be auto, online, offline or disabled, not {self.mode!r}")
        return self.mode

    def process_env(self, context: dg.AssetExecutionContext) -> dict[str, str]:
        """The W&B settings a training process started by this asset gets (its runs join the Dagster run's group)."""
        env = {
            "WANDB_RUN_GROUP": f"dagster-{context.run_id}",
            "WANDB_PROJECT": self.project,
            "WANDB_DIR": str(Path(self.dir).resolve()),
            "WANDB_MODE": self._mode(),
        }
        return {k: v for k, v in env.items() if v}

    def log_run(
        self,
        context: dg.AssetExecutionContext,
        job_type: str,
        summary: Mapping[str, float | int | str],
        tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence]]] = {},
        images: Mapping[str, Path] = {},
        config: Mapping | None = None,
        artifact: tuple[str, str, Sequence[Path]] | None = None,
    ) -> str | None:
        """One W&B run for this asset: `summary` as logged scalars and run summary, `tables` as
        wandb.Table (columns, rows), `images` as wandb.Image, and `artifact` (name, type, files or
        folders) as a versioned W&B artifact. Returns the run's local folder."""
        mode = self._mode()
        if mode == "disabled":
            return None
        import wandb

        Path(self.dir).mkdir(parents=True, exist_ok=True)
        asset_name = context.asset_key.to_user_string()
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=mode,
            dir=self.dir,
            group=f"dagster-{context.run_id}",
            job_type=job_type,
            name=f"{asset_name}-{context.run_id[:8]}",
            config=dict(config or {}),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            payload: dict = {f"{asset_name}/{k}": v for k, v in summary.items()}
            for key, (columns, rows) in tables.items():
                payload[f"{asset_name}/{key}"] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            for key, path in images.items():
                payload[f"{asset_name}/{key}"] = wandb.Image(str(path))
            run.log(payload)
            run.summary.update({f"{asset_name}/{k}": v for k, v in summary.items()})
            if artifact is not None:
                name, kind, items = artifact
                art = wandb.Artifact(name, type=kind)
                for item in items:
                    art.add_dir(str(item), name=item.name) if item.is_dir() else art.add_file(str(item))
                run.log_artifact(art)
            return str(Path(run.dir).parent)
        finally:
            run.finish()
