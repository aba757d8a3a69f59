"""The inference package: verified on load, refused with the file named when anything was changed."""

import json
import shutil

import pytest

from inference.runtime.generate import SamplingConfig
from inference.runtime.package import MANIFEST_FILE, load_package, verify
from inference.runtime.speculative import SpeculativeGenerator


def test_a_package_loads_and_generates(tiny_package):
    package = load_package(tiny_package)
    assert package.name == "frugal-tiny" and package.gamma == 3 and package.draft is not None
    cfg = SamplingConfig(max_new_tokens=8)
    prompt = package.target.tokenizer.encode("ka lo mi").ids
    spec = SpeculativeGenerator(package.target, package.draft, package.gamma)
    assert spec.generate_ids(prompt, cfg) == package.target.generate_ids(prompt, cfg)
    manifest = json.loads((tiny_package / MANIFEST_FILE).read_text())
    assert {"target/model.safetensors", "draft/model.safetensors", "package.json", "MODEL_CARD.md"} <= set(
        manifest["files"]
    )


def test_a_tampered_weight_file_is_refused_naming_it(tiny_package, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    weights = pkg / "target" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in a tensor: still a readable file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"target/model\.safetensors: sha256 does not match manifest\.json"):
        load_package(pkg)
    shutil.copy(tiny_package / "target" / "model.safetensors", weights)
    verify(pkg)
    (pkg / "draft" / "extra.bin").write_bytes(b"\x80\x04")  # an unlisted file (a pickle, say)
    with pytest.raises(ValueError, match=r"draft/extra\.bin: not listed in manifest\.json"):
        load_package(pkg)
    (pkg / "draft" / "extra.bin").unlink()
    (pkg / "draft" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"draft/tokenizer\.json: listed in manifest\.json but missing"):
        load_package(pkg)
