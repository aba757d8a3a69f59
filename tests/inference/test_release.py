"""The release: the wheel installs into a fresh virtual environment (no dagster, no deepspeed), verifies
and loads the package it carries, and generates what the project's own runtime generates."""

import json
import select
import subprocess
import tarfile
import venv

import torch
from openai import OpenAI

from inference.generate import SamplingConfig
from inference.package import load_package
from inference.release import build_wheel, tarball

TORCH = f"torch=={torch.__version__.split('+')[0]}"  # pinned: an unpinned torch would pull a CUDA build

GENERATE = """
import importlib.util, json
from frugal_runtime.inference.generate import SamplingConfig
from frugal_runtime.inference.package import bundled_package, load_package
package = load_package(bundled_package())
prompt = package.target.tokenizer.encode("ka lo mi").ids
print(json.dumps({
    "ids": package.target.generate_ids(prompt, SamplingConfig(max_new_tokens=8)),
    "missing": [m for m in ("dagster", "deepspeed", "training", "assets") if importlib.util.find_spec(m) is None],
}))
"""


def test_the_wheel_installs_into_a_fresh_venv_and_generates(tiny_package, tmp_path):
    wheel = build_wheel(tiny_package, tmp_path / "dist", tmp_path / "work")
    assert wheel.name == "frugal_tiny-0.0.1-py3-none-any.whl"
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel), TORCH], check=True, timeout=900)
    out = subprocess.run([python, "-c", GENERATE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["missing"] == ["dagster", "deepspeed", "training", "assets"]
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


def test_the_wheel_carries_every_runtime_module():
    """Each module of the engine and the server is in the wheel's list (a module left out breaks the
    installed server at import)."""
    from pathlib import Path

    from inference.release import RUNTIME_MODULES

    root = Path(__file__).resolve().parents[2] / "inference"
    for sub in ("engine", "server"):
        on_disk = {f"{sub}/{p.name}" for p in (root / sub).glob("*.py")}
        assert on_disk <= set(RUNTIME_MODULES["inference"]), on_disk - set(RUNTIME_MODULES["inference"])
