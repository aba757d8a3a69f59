"""A trained model on disk: `model.safetensors` (reference layout, never pickle), `config.json` (the
ModelConfig) and `tokenizer.json`. Loading checks every file, name and shape and says which is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "frugal-transformer/1"


def save_model(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path, extra: dict | None = None) -> None:
    """Write weights (reference layout) and config. A tied lm_head is stored once, as embed.weight."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "model": dataclasses.asdict(config), **(extra or {})}
    (out_dir / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_config(run_dir: Path) -> ModelConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{path}: missing: not a trained model folder")
    try:
        doc = json.loads(path.read_text())
        return ModelConfig(**doc["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Frugal model config ({e})") from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never pickle); a missing or unreadable file is named."""
    if not path.exists():
        raise ValueError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from e


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """The names and shapes in `tensors` (read from `path`) are exactly `expected`, or a ValueError says which not."""
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ValueError(f"{path}: tensors do not match {CONFIG_FILE}: missing {missing[:5]}, unexpected {unknown[:5]}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in tensors.items() if v.shape != expected[k]]
    if wrong:
        raise ValueError(f"{path}: wrong shapes for {CONFIG_FILE}: {'; '.join(wrong[:5])}")


def load_model(run_dir: Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """The reference Transformer with the saved weights, in eval mode."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    path = run_dir / WEIGHTS_FILE
    tensors = read_tensors(path)
    model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    check_tensors(path, tensors, expected)
    model.load_state_dict(tensors, strict=False)  # the tied lm_head shares embed.weight
    return model.to(dtype).eval()
