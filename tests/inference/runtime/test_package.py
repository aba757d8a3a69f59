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


def test_a_package_with_mtp_modules_serves_without_a_draft(mtp_package):
    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.engine.sampler import SamplingParams
    from inference.runtime.quantize import Int8Linear

    package = load_package(mtp_package)
    assert package.draft is None and len(package.target.model.mtp) == 2
    assert isinstance(package.target.model.mtp[0].eh_proj, Int8Linear)  # quantized with the target
    engine = Engine(package.target, package.draft, EngineConfig(gamma=package.gamma))
    assert engine.proposer == "mtp" and engine.gamma == 2
    prompt = package.target.tokenizer.encode("ka lo mi").ids
    got = []
    engine.add("a", prompt, SamplingParams(max_new_tokens=10, temperature=0), lambda out: got.extend(out.token_ids))
    engine.run_until_done()
    assert got == package.target.generate_ids(prompt, SamplingConfig(max_new_tokens=10))
    assert engine.stats.proposed > 0


def test_missing_or_mismatched_mtp_weights_are_refused_naming_the_tensor(mtp_package, tmp_path):
    from safetensors.torch import load_file, save_file

    from inference.runtime.package import write_manifest

    pkg = tmp_path / "pkg"
    shutil.copytree(mtp_package, pkg)
    weights = pkg / "target" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "mtp.1.eh_proj.q"}, str(weights))
    write_manifest(pkg)  # a consistent manifest: the weights themselves are what is wrong
    with pytest.raises(ValueError, match=r"target/model\.safetensors: missing mtp\.1\.eh_proj\.q"):
        load_package(pkg)
    save_file({k: v for k, v in tensors.items() if not k.startswith("mtp.1.")}, str(weights))
    write_manifest(pkg)
    with pytest.raises(ValueError, match=r"model\.safetensors: missing mtp\.1\."):
        load_package(pkg)
    wrong = dict(tensors)
    wrong["mtp.0.hnorm.weight"] = wrong["mtp.0.hnorm.weight"][:10]
    save_file(wrong, str(weights))
    write_manifest(pkg)
    with pytest.raises(ValueError, match=r"mtp\.0\.hnorm\.weight \(10,\) != \(64,\)"):
        load_package(pkg)
