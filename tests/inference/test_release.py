"""The release: the wheel installs into a fresh virtual environment (no dagster, no deepspeed), verifies
and loads the package it carries, and generates what the project's own runtime generates."""

import ast
import json
import select
import subprocess
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from inference.release import RUNTIME_PACKAGES, build_wheel, tarball
from inference.runtime.generate import SamplingConfig
from inference.runtime.package import load_package

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("inference", "model", "kernels", "training", "pipelines", "assets")
TORCH = f"torch=={torch.__version__.split('+')[0]}"  # pinned: an unpinned torch would pull a CUDA build

GENERATE = """
import importlib, importlib.util, json, pkgutil
import inference.runtime, kernels, model
from inference.runtime.generate import SamplingConfig
from inference.runtime.package import bundled_package, load_package
package = load_package(bundled_package())
prompt = package.target.tokenizer.encode("ka lo mi").ids
unimportable = {}
for pkg in (inference.runtime, model, kernels):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            unimportable[info.name] = err.name
print(json.dumps({
    "ids": package.target.generate_ids(prompt, SamplingConfig(max_new_tokens=8)),
    "missing": [m for m in ("dagster", "deepspeed", "training", "pipelines", "assets", "inference.release")
                if importlib.util.find_spec(m) is None],
    "unimportable": unimportable,
    "runtime_at": inference.runtime.__file__,
}))
"""


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_generates(tiny_package, tmp_path):
    wheel = build_wheel(tiny_package, tmp_path / "dist", tmp_path / "work")
    assert wheel.name == "frugal_tiny-0.0.1-py3-none-any.whl"
    assert "kernels/csrc/w4a8.cpp" in zipfile.ZipFile(wheel).namelist()  # INT4 layers build their op from it
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel), TORCH], check=True, timeout=900)
    out = subprocess.run([python, "-c", GENERATE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["missing"] == ["dagster", "deepspeed", "training", "pipelines", "assets", "inference.release"]
    assert str(tmp_path / "venv") in got["runtime_at"]  # the installed copy, not the checkout
    # every module imports except three that need what a served model does not: the lm_eval plugin needs
    # lm_eval (installed beside it by whoever runs the harness), and model/'s two training-side modules need
    # DeepSpeed and pyarrow (tokenizer training reads the curated shards)
    assert got["unimportable"] == {
        "inference.runtime.lm_eval_adapter": "lm_eval",
        "model.moe_deepspeed": "deepspeed",
        "model.tokenizer": "pyarrow",
    }
    package = load_package(tiny_package)
    prompt = package.target.tokenizer.encode("ka lo mi").ids
    assert got["ids"] == package.target.generate_ids(prompt, SamplingConfig(max_new_tokens=8))
    help_text = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "frugal-serve"), "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "--package" in help_text.stdout
    # the installed console script serves its bundled package: the same greedy text over HTTP
    cmd = [str(tmp_path / "venv" / "bin" / "frugal-serve"), "--port", "0", "--threads", "1", "--no-compile"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 120)
        line = server.stdout.readline() if ready else ""
        assert line.startswith("serving frugal-tiny on http://127.0.0.1:"), line
        client = OpenAI(base_url=f"{line.split()[-1]}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="frugal-tiny", prompt="ka lo mi", max_tokens=8, temperature=0)
        assert out.choices[0].text == package.target.tokenizer.decode(got["ids"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_tarball_holds_the_package_folder(tiny_package, tmp_path):
    path = tarball(tiny_package, tmp_path)
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    assert {"frugal_tiny-0.0.1/manifest.json", "frugal_tiny-0.0.1/target/model.safetensors"} <= names


def first_party_imports(path: Path) -> set[str]:
    """The first-party modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in FIRST_PARTY and module_file(n)}
    return found


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def test_the_runtime_imports_only_what_the_wheel_carries():
    """Every first-party module the runtime reaches, directly or through model/ and kernels/, lies in one of
    the folders the wheel copies: no training, pipelines, assets or build-time inference module (a module
    outside them would break the installed server at import)."""
    todo = [p for p in (ROOT / "inference" / "runtime").rglob("*.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in first_party_imports(path):
            file = module_file(name)
            rel = file.relative_to(ROOT).as_posix()
            assert rel == "inference/__init__.py" or any(rel.startswith(f"{f}/") for f in RUNTIME_PACKAGES), (
                f"{path.relative_to(ROOT)} imports {name} ({rel}), which the wheel does not carry"
            )
            todo.append(file)
    reached = {p.relative_to(ROOT).as_posix() for p in seen}
    assert {"model/transformer.py", "model/io.py", "kernels/native.py", "inference/runtime/server/app.py"} <= reached
