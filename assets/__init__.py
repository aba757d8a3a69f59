"""Frugal's Dagster layer: assets, asset checks and resources. Thin: build the stage config from the
Dagster config, call the plain function in `pipelines/`, return metadata."""
