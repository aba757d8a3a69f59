"""Building a release of the inference package (build time: this module is not part of the runtime).

`assemble` lays out the package folder (see inference.runtime.package) from a target and a draft folder;
`build_wheel` turns it into a pip-installable wheel whose only dependencies are torch, tokenizers,
safetensors and the server's (FastAPI, uvicorn, prometheus_client). The wheel carries the runtime
subpackage, `inference/runtime/` (generation, quantized layers, KV caches, speculative decoding, the serving
engine, package loading and the server), and the two folders it imports, `model/` and `kernels/`, each
copied as it is in the checkout: the code a release runs is byte for byte the code the tests run. The
package folder goes inside the runtime as `inference/runtime/package/`, and `frugal-serve` is a console
script. Since the wheel provides the top-level packages `inference`, `model` and `kernels`, install a
release into an environment of its own (not into a checkout's).
`tarball` packs the folder as a .tar.gz.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from inference.runtime.package import FORMAT, MODEL_CARD_FILE, PACKAGE_FILE, write_manifest
from model.io import atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "quantization.json", "model.safetensors", "tokenizer.json", "kv_scales.safetensors")
RUNTIME_PACKAGES = ("inference/runtime", "model", "kernels")
"""The folders the wheel carries whole: the runtime and what it imports (no training, assets or pipelines)."""
RUNTIME_DEPENDENCIES = (
    "torch>=2.4", "tokenizers>=0.19", "safetensors>=0.4", "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20",
)  # fmt: skip


def assemble(out_dir: Path, target_dir: Path, draft_dir: Path | None, meta: dict, model_card: str) -> dict:
    """Write the package folder: target/, draft/, package.json, MODEL_CARD.md, manifest.json. Returns the
    manifest. The folder replaces any previous one as a whole (model.io.atomic_dir), so a killed release never
    leaves a package whose files disagree with its manifest."""
    with atomic_dir(Path(out_dir)) as staging:
        for role, src in (("target", target_dir), ("draft", draft_dir)):
            if src is None:
                continue
            (staging / role).mkdir(parents=True)
            for name in MODEL_FILES:
                if (Path(src) / name).exists():
                    shutil.copy(Path(src) / name, staging / role / name)
        (staging / PACKAGE_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
        (staging / MODEL_CARD_FILE).write_text(model_card)
        return write_manifest(staging)


def wheel_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).lower()


def build_wheel(package_dir: Path, dist_dir: Path, work_dir: Path) -> Path:
    """A wheel named after package.json's name and version, holding the runtime and the package folder."""
    meta = json.loads((Path(package_dir) / PACKAGE_FILE).read_text())
    stage = Path(work_dir) / "wheel-src"
    if stage.exists():
        shutil.rmtree(stage)
    for folder in RUNTIME_PACKAGES:
        shutil.copytree(ROOT / folder, stage / folder, ignore=shutil.ignore_patterns("__pycache__", "package"))
    shutil.copy(ROOT / "inference" / "__init__.py", stage / "inference" / "__init__.py")
    shutil.copytree(package_dir, stage / "inference" / "runtime" / "package")
    deps = ", ".join(f'"{d}"' for d in RUNTIME_DEPENDENCIES)
    (stage / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{wheel_name(meta["name"])}"
version = "{meta["version"]}"
description = "{meta["name"]}: a Frugal model with its inference runtime and OpenAI-compatible server"
requires-python = ">=3.10"
dependencies = [{deps}]

[project.scripts]
frugal-serve = "inference.runtime.serve:main"

[project.entry-points."lm_eval.models"]
frugal = "inference.runtime.lm_eval_adapter:FrugalLM"

[tool.setuptools.packages.find]
include = ["inference", "inference.runtime*", "model*", "kernels*"]

[tool.setuptools.package-data]
"*" = ["*.json", "*.safetensors", "*.md"]
"kernels" = ["csrc/*.cpp"]  # kernels/w4a8.py builds its C++ op from it on first use
"""
    )
    Path(dist_dir).mkdir(parents=True, exist_ok=True)
    with atomic_dir(Path(work_dir) / "wheel-dist") as built:  # pip writes here; the wheel is renamed into place
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(built)]
        subprocess.run([*cmd, str(stage)], check=True, capture_output=True, text=True)
        [wheel] = built.glob(f"{wheel_name(meta['name'])}-{meta['version']}-*.whl")
        with atomic_file(Path(dist_dir) / wheel.name) as tmp:
            shutil.copyfile(wheel, tmp)
    return Path(dist_dir) / wheel.name


def tarball(package_dir: Path, dist_dir: Path) -> Path:
    meta = json.loads((Path(package_dir) / PACKAGE_FILE).read_text())
    out = Path(dist_dir) / f"{wheel_name(meta['name'])}-{meta['version']}.tar.gz"
    with atomic_file(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(package_dir, arcname=f"{wheel_name(meta['name'])}-{meta['version']}")
    return out
