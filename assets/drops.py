"""Input drops: the partitions of the curation assets, and the location the `new_drops` sensor watches.

A drop is one file or folder that lands in the watched location (a local folder or an fsspec URL). Its name is its
partition key. The embedded sample corpus is the drop `sample`, so the demo runs with nothing to watch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

DROPS = dg.DynamicPartitionsDefinition(name="drops")
SAMPLE_DROP = "sample"
"""The drop of the embedded sample corpus (pipelines.sample_corpus); a file of this name in the location is ignored."""
DROP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a drop's name may be (its partition key and folder name); other names are skipped with the reason."""


@dataclass(frozen=True, slots=True)
class Drop:
    """A file or folder in the location, as one sensor tick saw it."""

    name: str
    url: str
    bytes: int
    files: int


class DropLocation(dg.ConfigurableResource):
    """Where new drops land: a folder or an fsspec URL (s3://bucket/crawl, ...); empty means `<data_dir>/drops`."""

    url: str = ""
    data_dir: str = "data"

    def resolved(self) -> str:
        return self.url or str(Path(self.data_dir) / "drops")

    def drop_url(self, name: str) -> str:
        return f"{self.resolved().rstrip('/')}/{name}"

    def scan(self) -> tuple[list[Drop], list[str]]:
        """The drops in the location, and a reason for each entry that is not one. OSError when it cannot be listed."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.resolved())
        if not fs.isdir(root):
            raise FileNotFoundError(f"{self.resolved()}: no such folder")
        drops, skipped = [], []
        for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
            name = os.path.basename(entry["name"].rstrip("/"))
            if name.startswith((".", "_")):  # hidden files, and temp names of writers that rename when done
                continue
            if name == SAMPLE_DROP or not DROP_NAME.match(name):
                skipped.append(f"{name!r}: not a drop name (letters, digits, '.', '_', '-'; not {SAMPLE_DROP!r})")
                continue
            if entry["type"] == "directory":
                files = [f for f in fs.find(entry["name"], detail=True).values() if f["type"] == "file"]
                size, count = sum(int(f["size"] or 0) for f in files), len(files)
            else:
                size, count = int(entry["size"] or 0), 1
            drops.append(Drop(name, self.drop_url(name), size, count))
        return drops, skipped


def main(argv: list[str] | None = None) -> int:
    """`python -m assets.drops add NAME...`: add drops to the Dagster instance (`$DAGSTER_HOME`) by hand, as the
    sensor does; `make demo` adds the `sample` drop this way."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["add", "list"])
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    bad = [n for n in args.names if not DROP_NAME.match(n)]
    if bad:
        parser.error(f"not drop names: {bad} (letters, digits, '.', '_', '-')")
    with dg.DagsterInstance.get() as instance:
        known = instance.get_dynamic_partitions(DROPS.name)
        if args.command == "add":
            new = [n for n in args.names if n not in known]
            if new:
                instance.add_dynamic_partitions(DROPS.name, new)
            known += new
        print("\n".join(known))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
