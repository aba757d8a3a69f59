"""A trained model on disk: `model.safetensors` (reference layout, never pickle), `config.json` (the
ModelConfig) and `tokenizer.json`. Loading checks every file, name and shape and says which is wrong.

Files are written atomically (`atomic_file`: a temp file beside the target, renamed over it once whole), so
a process killed mid-write leaves the previous file or none, never half of one; temp files of dead writers
are removed by the next write to the same path. Tensors are read into storage that torch owns, contiguous
and aligned (kernels.native.owned), never left as views into the file's buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kernels.native import owned
from model.config import ModelConfig
from model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "frugal-transformer/1"


TEMP_SUFFIX = ".tmp"


def temp_path(final: Path) -> Path:
    """A fresh temp path beside `final`, named `.NAME.PID.RANDOM.tmp` so the writer's pid is known."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temp files and folders of `final` (see `temp_path`) left by writers that no longer run."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.*{TEMP_SUFFIX}"):
        pid = tmp.name[len(final.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a liveness probe, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _cannot_write(final: Path, e: OSError) -> OSError:
    """The same error, naming the file it was writing (a temp name or a folder would say less)."""
    return OSError(e.errno, f"{final}: cannot write: {e.strerror or e}")


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it is flushed to disk and renamed over `final`, on error
    removed. Errors name `final` (a full disk or a read-only folder says which file it could not write)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
    except OSError as e:
        raise _cannot_write(final, e) from e
    tmp = temp_path(final)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        raise _cannot_write(final, e) from e
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this; nothing was written there
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields an empty temp folder to fill; on success it replaces `final` as a whole, on error it is removed.
    A reader sees the previous folder or the new one, never a mix. (Two renames: a kill between them leaves
    `final` missing, which a reader reports, and the old folder as a stale temp that the next write removes.)"""
    final = Path(final)
    staging = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        staging.mkdir()
    except OSError as e:
        raise _cannot_write(final, e) from e
    try:
        yield staging
        old = temp_path(final)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _cannot_write(final, e) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically. safetensors reports I/O failures as SafetensorError ("... (os error
    28)"); they come out as the OSError they are, naming the file."""
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            code = next((int(m) for m in re.findall(r"os error (\d+)", str(e))), None)
            raise OSError(code, os.strerror(code) if code else str(e)) from e


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_model(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path, extra: dict | None = None) -> None:
    """Write weights (reference layout) and config. A tied lm_head is stored once, as embed.weight."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_tensors(tensors, out_dir / WEIGHTS_FILE, metadata={"format": FORMAT})
    doc = {"format": FORMAT, "model": dataclasses.asdict(config), **(extra or {})}
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")


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
    """Every tensor of a safetensors file (never pickle), each copied into storage torch owns (see top); a
    missing or unreadable file is named."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: missing")
    try:
        return {name: owned(t) for name, t in load_file(str(path)).items()}
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


def md_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (| escaped, newlines flattened)."""

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
