"""The dataset of the tiny local lm_eval tasks: a JSONL file next to this one, read here (a task's
`custom_dataset`) so that the folder works from any working directory: `datasets.load_dataset("json",
data_files=...)` would resolve a relative path against the working directory, not the task's YAML."""

import json
from pathlib import Path

import datasets


def load_jsonl(file: str, **metadata) -> datasets.DatasetDict:
    """The rows of `file` (relative to this folder) as the test split; lm_eval also passes the task's
    metadata and the model's arguments, which the data does not depend on."""
    lines = (Path(__file__).parent / file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
