"""A dedup index persisted across input drops: what exact and near-dedup of a new drop check it against.

Each drop (a partition) adds one Parquet table, and the earlier tables are never rewritten. The index folder holds:
- `index.json`, the manifest: the format version, the kind (`exact` or `minhash`), the parameters the tables were
  made with, and the drops in the order they were added. For each drop it records its table's file, rows and sha256,
  its first global position, the sha256 of its ids, and the cluster merges it caused.
- `NNNN.parquet`: one table per drop.

Rules:
- A drop is deduplicated against the drops added before it, so re-running a drop with the same documents gives the
  same result and the same bytes, however many drops came after it.
- A drop whose documents changed may replace its table only when it is the last drop. Otherwise later drops were
  deduplicated against the old documents, and the index refuses it.
- A manifest or table that does not read, or whose sha256 or parameters differ from what is expected, is refused
  naming the file. `python -m pipelines.dedup_rebuild STAGE_DIR` rebuilds the index from the drops' own outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.curriculum import sha256_file
from pipelines.stage import Pending, write_table

FORMAT = "frugal-dedup-index"
VERSION = 1
MANIFEST_FILE = "index.json"
INDEX_DIR = "index"
PARTITIONS_DIR = "partitions"


class DedupIndexError(ValueError):
    """The index cannot be used as it is; the message names the file and how to rebuild it."""


def rebuild_hint(folder: Path) -> str:
    return f"rebuild it with: python -m pipelines.dedup_rebuild {folder.parent}"


def ids_sha256(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


@dataclass(slots=True)
class Entry:
    """One drop in the index."""

    key: str
    file: str
    rows: int
    first_position: int  # global position of the drop's first document: drops before it hold positions below it
    ids_sha256: str
    sha256: str
    merges: list[list[int]]  # [from_cluster, to_cluster]: earlier clusters this drop joined into one


class PartitionIndex:
    """The index of one stage (`kind`), made with `params`. Opening it checks the manifest; `load` checks tables."""

    def __init__(self, folder: str | Path, kind: str, params: dict):
        self.folder = Path(folder)
        self.kind = kind
        self.params = json.loads(json.dumps(params, sort_keys=True))  # as stored: lists, not tuples
        self.entries: list[Entry] = []
        manifest = self.folder / MANIFEST_FILE
        if not manifest.exists():
            if self.folder.exists() and any(self.folder.glob("*.parquet")):
                raise DedupIndexError(f"{manifest}: missing, but the folder holds index tables; {self._hint()}")
            return
        try:
            data = json.loads(manifest.read_text())
            entries = [Entry(**e) for e in data["partitions"]]
            found = (data["format"], data["version"], data["kind"], data["params"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DedupIndexError(f"{manifest}: unreadable dedup index manifest ({e}); {self._hint()}") from e
        if found[:3] != (FORMAT, VERSION, kind):
            raise DedupIndexError(
                f"{manifest}: a {found[0]} v{found[1]} {found[2]} index, expected {FORMAT} v{VERSION} {kind}; "
                f"{self._hint()}"
            )
        if found[3] != self.params:
            changed = sorted(k for k in set(found[3]) | set(self.params) if found[3].get(k) != self.params.get(k))
            raise DedupIndexError(
                f"{manifest}: made with other parameters ({', '.join(changed)}: "
                f"{[found[3].get(k) for k in changed]} there, {[self.params.get(k) for k in changed]} now); "
                f"{self._hint()}"
            )
        self.entries = entries

    def _hint(self) -> str:
        return rebuild_hint(self.folder)

    def position(self, key: str) -> int:
        """Index of `key` among the drops; a new key comes after all of them."""
        return next((i for i, e in enumerate(self.entries) if e.key == key), len(self.entries))

    def before(self, key: str) -> list[Entry]:
        """The drops that `key` is deduplicated against: those added before it."""
        return self.entries[: self.position(key)]

    def first_position(self, key: str) -> int:
        return sum(e.rows for e in self.before(key))

    def load(self, entries: Sequence[Entry], columns: Sequence[str] | None = None) -> pa.Table | None:
        """The tables of `entries`, checked against their sha256, concatenated (None when there are none)."""
        tables = []
        for entry in entries:
            path = self.folder / entry.file
            try:  # the file is read once: hashed, then parsed from the same bytes
                data = path.read_bytes()
                ok = hashlib.sha256(data).hexdigest() == entry.sha256
                table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None) if ok else None
            except (OSError, pa.ArrowException) as e:
                raise DedupIndexError(f"{path}: unreadable dedup index table ({e}); {self._hint()}") from e
            if table is None or table.num_rows != entry.rows:
                raise DedupIndexError(f"{path}: corrupt (its sha256 differs from {MANIFEST_FILE}); {self._hint()}")
            tables.append(table)
        return pa.concat_tables(tables) if tables else None

    def merges(self, entries: Sequence[Entry]) -> dict[int, int]:
        """Cluster id -> the cluster it was merged into, by the drops in `entries`."""
        return {a: b for e in entries for a, b in e.merges}

    def put(self, key: str, table: pa.Table, ids: Sequence[str], merges: Sequence[tuple[int, int]] = ()) -> None:
        """Record drop `key`'s table: appended for a new drop, replaced for the last one, and left as it is for an
        earlier drop re-run with the same documents (which gives the same table)."""
        digest = ids_sha256(ids)
        i = self.position(key)
        if i < len(self.entries) - 1:
            if self.entries[i].ids_sha256 != digest:
                later = ", ".join(e.key for e in self.entries[i + 1 :])
                raise DedupIndexError(
                    f"{self.folder / MANIFEST_FILE}: drop {key!r} now holds other documents than when it was indexed, "
                    f"and the drops added after it ({later}) were deduplicated against those; {self._hint()}"
                )
            return
        file = f"{i:04d}.parquet"
        pending = write_table(table, self.folder / file)
        entry = Entry(key, file, table.num_rows, self.first_position(key), digest, sha256_file(pending.tmp),
                      [list(map(int, m)) for m in merges])  # fmt: skip
        entries = [*self.entries[:i], entry]
        manifest = Pending(self.folder / MANIFEST_FILE)
        with manifest.writing() as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "kind": self.kind, "params": self.params,
                                       "partitions": [asdict(e) for e in entries]}, indent=1))  # fmt: skip
        pending.commit()  # the table first: a crash between the two leaves the old manifest, which ignores it
        manifest.commit()
        self.entries = entries


def index_record(index: PartitionIndex, key: str, inputs: Sequence[str]) -> dict:
    """What a drop's stats.json records of its place in the index, so that `rebuild` can replay the drops."""
    return {"partition": key, "position": index.position(key), "first_position": index.first_position(key),
            "inputs": list(inputs), "params": index.params}  # fmt: skip
