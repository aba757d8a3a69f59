"""Building a release of the inference package (build time: this module is not part of the runtime).

`assemble` lays out the package folder (see inference.package) from a target and a draft folder;
`build_wheel` turns it into a pip-installable wheel whose only dependencies are torch, tokenizers,
safetensors and the server's (FastAPI, uvicorn, prometheus_client): the runtime modules (inference
generation, quantized layers, KV cache, speculative decoding, the serving engine and the server; the model
code; the kernels) are vendored under one top-level package, `frugal_runtime`,
with the package folder inside it as `frugal_runtime/package/`, and `frugal-serve` as a console script.
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

from inference.package import FORMAT, MODEL_CARD_FILE, PACKAGE_FILE, write_manifest
from model.io import atomic_dir, atomic_file

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "quantization.json", "model.safetensors", "tokenizer.json", "kv_scales.safetensors")
RUNTIME_MODULES = {
    "model": ("__init__.py", "config.py", "transformer.py", "io.py"),
    "inference": (
        "__init__.py", "generate.py", "speculative.py", "quantize.py", "kv_cache.py", "package.py", "serve.py",
        "lm_eval_adapter.py",
        "engine/__init__.py", "engine/block_pool.py", "engine/paged_cache.py", "engine/runner.py",
        "engine/sampler.py", "engine/scheduler.py", "engine/spec_decode.py", "engine/engine.py",
        "engine/experts.py", "engine/process.py", "engine/compiled.py",
        "server/__init__.py", "server/protocol.py", "server/serving.py", "server/app.py",
    ),
    "kernels": ("__init__.py", "dispatch.py", "native.py", "kv_int8.py", "w4a16.py", "attention_int8.py",
                "paged_attention_int8.py"),
}  # fmt: skip
"""What the wheel carries: the modules a served model imports (no training, assets or pipelines)."""
RUNTIME_DEPENDENCIES = (
    "torch>=2.4", "tokenizers>=0.19", "safetensors>=0.4", "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20",
)  # fmt: skip
VENDOR = "frugal_runtime"


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


def _vendored(source: str) -> str:
    """Rewrite absolute imports of the runtime packages to their vendored names."""
    pattern = r"^(\s*)(from|import) (model|inference|kernels)\b"
    return re.sub(pattern, rf"\1\2 {VENDOR}.\3", source, flags=re.MULTILINE)


def wheel_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).lower()


def build_wheel(package_dir: Path, dist_dir: Path, work_dir: Path) -> Path:
    """A wheel named after package.json's name and version, holding the runtime and the package folder."""
    meta = json.loads((Path(package_dir) / PACKAGE_FILE).read_text())
    stage = Path(work_dir) / "wheel-src"
    if stage.exists():
        shutil.rmtree(stage)
    vendor = stage / VENDOR
    vendor.mkdir(parents=True)
    (vendor / "__init__.py").write_text(
        f'"""{meta["name"]} {meta["version"]}: the Frugal inference runtime and its model (see package/)."""\n'
    )
    for pkg, modules in RUNTIME_MODULES.items():
        (vendor / pkg).mkdir()
        for module in modules:
            (vendor / pkg / module).parent.mkdir(parents=True, exist_ok=True)
            (vendor / pkg / module).write_text(_vendored((ROOT / pkg / module).read_text()))
    shutil.copytree(package_dir, vendor / "package")
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
frugal-serve = "{VENDOR}.inference.serve:main"

[project.entry-points."lm_eval.models"]
frugal = "{VENDOR}.inference.lm_eval_adapter:FrugalLM"

[tool.setuptools.packages.find]
include = ["{VENDOR}*"]

[tool.setuptools.package-data]
"*" = ["*.json", "*.safetensors", "*.md"]
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
