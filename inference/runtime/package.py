"""The inference package: a folder that holds everything needed to serve a model, verified on load.

    package.json     name, version, the weights scheme, KV cache and gamma to serve with, lineage
    target/          the served model: config.json, quantization.json (unless fp32), model.safetensors,
                     tokenizer.json, kv_scales.safetensors (optional)
    draft/           the speculative-decoding draft, the same files (optional)
    MODEL_CARD.md    what the model is, where it came from, how it measured
    manifest.json    sha256 and size of every other file

`load_package` checks every file against the manifest before reading any weight (a changed, missing or
unlisted file is refused, naming it), then loads safetensors and JSON only: nothing is ever unpickled.
Dependencies: torch, tokenizers, safetensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from inference.runtime.generate import Generator
from model.io import write_text_atomic

FORMAT = "frugal-package/1"
PACKAGE_FILE = "package.json"
MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "MODEL_CARD.md"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_files(root: Path) -> list[Path]:
    """Every file of the package except the manifest, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(root: Path) -> dict:
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in package_files(root)
    }
    manifest = {"format": FORMAT, "files": files}
    write_text_atomic(root / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(root: Path) -> dict:
    """The manifest, once every file matches it; otherwise a ValueError naming the first file that does not."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.exists():
        raise ValueError(f"{path}: missing: not a Frugal inference package")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a package manifest ({e})") from e
    for name, entry in sorted(files.items()):
        file = root / name
        if not file.is_file():
            raise ValueError(f"{file}: listed in {MANIFEST_FILE} but missing")
        if file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise ValueError(f"{file}: sha256 does not match {MANIFEST_FILE}: the file was changed or corrupted")
    unlisted = [p.relative_to(root).as_posix() for p in package_files(root)]
    unlisted = [n for n in unlisted if n not in files and "__pycache__" not in n]
    if unlisted:
        raise ValueError(f"{root / unlisted[0]}: not listed in {MANIFEST_FILE}")
    return manifest


def bundled_package() -> Path:
    """The package folder a release wheel carries (inference/runtime/package/, beside this module); a
    ValueError when this runtime is not an installed release."""
    path = Path(__file__).resolve().parent / "package"
    if not (path / MANIFEST_FILE).exists():
        raise ValueError(f"{path}: no bundled package here (this is not an installed release): pass --package PATH")
    return path


@dataclass
class Package:
    root: Path
    meta: dict
    target: Generator
    draft: Generator | None

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def gamma(self) -> int:
        return int(self.meta.get("gamma", 4))


def load_package(root: str | Path, kv_cache: str | None = None, check: bool = True) -> Package:
    """Verify (unless check=False) and load a package; kv_cache overrides the one package.json names."""
    root = Path(root)
    if check:
        verify(root)
    path = root / PACKAGE_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{path}: missing: not a Frugal inference package") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    kv = kv_cache or meta.get("kv_cache", "fp32")
    target = Generator.from_run(root / "target", kv_cache=kv)
    draft = Generator.from_run(root / "draft") if (root / "draft").is_dir() else None
    if draft is not None and draft.tokenizer.to_str() != target.tokenizer.to_str():
        raise ValueError(f"{root / 'draft' / 'tokenizer.json'}: differs from the target's tokenizer")
    return Package(root, meta, target, draft)
