"""model.io: tensors read into owned storage, atomic files and folders, and what a full disk or a read-only folder
does to a model being saved."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from kernels.native import is_owned
from model.config import debug_tiny
from model.io import WEIGHTS_FILE, atomic_dir, atomic_file, read_tensors, temp_path
from model.transformer import Transformer
from tests.conftest import run_with_tmpfs


def test_read_tensors_returns_owned_aligned_copies(tmp_path):
    save_file({"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(5, 7)}, str(tmp_path / "w.safetensors"))
    tensors = read_tensors(tmp_path / "w.safetensors")
    assert all(is_owned(t) for t in tensors.values())
    assert torch.equal(tensors["a"], torch.arange(3, dtype=torch.int8))


def test_a_dead_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    final = tmp_path / "summary.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = final.with_name(f".{final.name}.{dead.stdout.strip()}.abc.tmp")  # what a killed writer leaves
    stale.write_text("{half")
    alive = temp_path(final)  # this process's own temp: a writer still running
    alive.write_text("{")
    with atomic_file(final) as tmp:
        tmp.write_text("{}")
    assert json.loads(final.read_text()) == {} and not stale.exists() and alive.exists()


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "package"
    with atomic_dir(final) as staging:
        (staging / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(final) as staging:
        (staging / "b.txt").write_text("two")
        raise RuntimeError("the build failed half-way")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]  # the first folder, untouched
    with atomic_dir(final) as staging:
        (staging / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["package"]  # no staging or old folder left


SAVE_TWICE = """
import hashlib, json, sys, torch
from pathlib import Path
from model.config import debug_tiny
from model.io import save_model
from model.transformer import Transformer
out, fault = Path(sys.argv[1]), sys.argv[2]
model = Transformer(debug_tiny())
save_model(model.state_dict(), model.config, out)
before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
if fault == "read_only":
    import subprocess
    subprocess.run(["mount", "-o", "remount,ro", str(out.parent)], check=True)
state = model.state_dict() if fault == "read_only" else {**model.state_dict(), "extra": torch.randn(1024, 1024)}
try:
    save_model(state, model.config, out)
    error = None
except OSError as e:
    error = str(e)
after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
print(json.dumps({"error": error, "same": before == after, "files": sorted(after)}))
"""


@pytest.mark.parametrize(("fault", "reason"), [("full", "No space left on device"), ("read_only", "Read-only")])
def test_saving_a_model_to_a_full_or_read_only_disk_names_the_file_and_keeps_the_saved_one(
    tmp_path, monkeypatch, fault, reason
):
    monkeypatch.setenv("SCRIPT", SAVE_TWICE)
    model_bytes = sum(t.numel() * 4 for t in Transformer(debug_tiny()).state_dict().values())
    disk = tmp_path / "disk"
    size = f"{(3 * model_bytes) // 1024}k"  # room for one model and its temp, not for 4 MiB more
    proc = run_with_tmpfs(disk, size, f'"$PY" -c "$SCRIPT" "{disk}/run" {fault}', timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"].startswith("[Errno") and f"{disk}/run/" in result["error"] and reason in result["error"]
    assert result["same"] and result["files"] == ["config.json", WEIGHTS_FILE]  # the saved model, as it was
