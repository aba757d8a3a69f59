"""curriculum_shards: bucket scored documents by quality tier x difficulty tier, write them in
curriculum order as zstd Parquet shards with a manifest.

CLI: python -m pipelines.curriculum --input scored/documents.parquet --output DIR
     [--difficulty compression_ratio|word_entropy|readability] [--order easy_to_hard|quality_annealing]

Tiers are quantiles over the kept documents: quality tier 0 holds the lowest scores, difficulty tier 0
the easiest documents. Difficulty signals (higher = harder):
- compression_ratio: zlib-compressed bytes / UTF-8 bytes (redundant text compresses well: easy);
- word_entropy: Shannon entropy in bits of the document's word distribution;
- readability: Flesch-Kincaid grade, 0.39 * words/sentence + 11.8 * syllables/word - 15.59.
Orders (bucket 0 is read first):
- easy_to_hard: difficulty tier ascending, and within it quality tier descending (best first);
- quality_annealing: quality tier ascending (low to high, ending on the best data), then difficulty.
Within a bucket, documents are in a seeded pseudo-random order (a hash of seed and id), so the output
does not depend on the input order. The same input and config give identical bytes.

Memory: the stage holds all kept documents, since the curriculum order is global.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.cli import reader_config, run_stage, stage_parser
from pipelines.document import Document, Ledger
from pipelines.progress import track
from pipelines.readers import ReaderConfig, count_records, read_documents
from pipelines.stage import LEDGER_FILE, STATS_FILE, StageStats, atomic_path, finish_stage, logger

STAGE = "curriculum_shards"
MANIFEST_FILE = "manifest.json"
SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("quality_score", pa.float32(), nullable=False),
        pa.field("bucket", pa.int16(), nullable=False),
        pa.field("difficulty", pa.float32(), nullable=False),
        pa.field("n_chars", pa.int32(), nullable=False),
    ]
)
DIFFICULTY_SIGNALS = ("compression_ratio", "word_entropy", "readability")
ORDERS = ("easy_to_hard", "quality_annealing")


@dataclass(kw_only=True, slots=True)
class CurriculumConfig:
    """Buckets, their order, and the shard files."""

    n_quality_tiers: int = 3
    """Quality tiers (quantiles of quality_score)."""
    n_difficulty_tiers: int = 2
    """Difficulty tiers (quantiles of the difficulty signal)."""
    difficulty: str = "compression_ratio"
    """compression_ratio, word_entropy or readability."""
    order: str = "easy_to_hard"
    """easy_to_hard or quality_annealing."""
    target_shard_bytes: int = 32 * 2**20
    """A new shard starts once a shard's text reaches this many bytes."""
    row_group_rows: int = 1024
    """Rows per Parquet row group (the unit a training data loader reads)."""
    seed: int = 0
    """Seeds the order of documents within a bucket."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def check(self) -> None:
        if self.difficulty not in DIFFICULTY_SIGNALS:
            raise ValueError(f"difficulty must be one of {DIFFICULTY_SIGNALS}, not {self.difficulty!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {self.order!r}")
        if self.n_quality_tiers < 1 or self.n_difficulty_tiers < 1:
            raise ValueError("n_quality_tiers and n_difficulty_tiers must be at least 1")


_WORD_RE = re.compile(r"[A-Za-z]+|\w+")
_SENTENCE_RE = re.compile(r"[.!?]+(?:\s|$)")
_VOWEL_GROUPS_RE = re.compile(r"[aeiouy]+")


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(len(raw), 1)


def word_entropy(text: str) -> float:
    counts = Counter(w.lower() for w in _WORD_RE.findall(text))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    p = np.fromiter(counts.values(), dtype=np.float64) / total
    return float(-(p * np.log2(p)).sum())


def _syllables(word: str) -> int:
    groups = len(_VOWEL_GROUPS_RE.findall(word.lower()))
    if word.lower().endswith("e") and groups > 1:
        groups -= 1
    return max(groups, 1)


def readability(text: str) -> float:
    words = [w for w in _WORD_RE.findall(text) if w.isalpha()]
    if not words:
        return 0.0
    sentences = max(len(_SENTENCE_RE.findall(text)), 1)
    syllables = sum(_syllables(w) for w in words)
    return 0.39 * len(words) / sentences + 11.8 * syllables / len(words) - 15.59


SIGNALS = {"compression_ratio": compression_ratio, "word_entropy": word_entropy, "readability": readability}


def tiers(values: np.ndarray, n_tiers: int) -> np.ndarray:
    """Tier of each value: 0 .. n_tiers-1 by rank (equal-sized quantile tiers; ties by position)."""
    if len(values) == 0:
        return np.empty(0, dtype=np.int64)
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.lexsort((np.arange(len(values)), values))] = np.arange(len(values))
    return ranks * n_tiers // len(values)


def bucket_order(config: CurriculumConfig) -> list[tuple[int, int]]:
    """(quality_tier, difficulty_tier) of bucket 0, 1, ... in curriculum order."""
    q_tiers, d_tiers = range(config.n_quality_tiers), range(config.n_difficulty_tiers)
    if config.order == "easy_to_hard":
        return [(q, d) for d in d_tiers for q in reversed(q_tiers)]
    return [(q, d) for q in q_tiers for d in d_tiers]


def code_version() -> str:
    """git commit of the code (with -dirty when the tree has changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"frugal-{version('frugal')}"
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard_files(
    rows: list[dict], output_dir: Path, target_shard_bytes: int, row_group_rows: int | None = None
) -> list[dict]:
    """Rows (dicts of SHARD_SCHEMA's columns but n_chars, in reading order) as shard-NNNNN.parquet files
    of about target_shard_bytes of text each, written atomically; shards left from an earlier, longer
    run are removed. Returns each shard's manifest entry: path, rows, bytes, sha256, bucket counts."""
    output_dir.mkdir(parents=True, exist_ok=True)
    shards, current, current_bytes = [], [], 0
    for row in rows:
        current.append(row)
        current_bytes += len(row["text"].encode("utf-8"))
        if current_bytes >= target_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
    if current:
        shards.append(current)
    entries = []
    for n, part in enumerate(shards):
        name = f"shard-{n:05d}.parquet"
        columns = {
            key: [r[key] for r in part] for key in ("id", "text", "source", "quality_score", "bucket", "difficulty")
        }
        table = pa.Table.from_pydict({**columns, "n_chars": [len(t) for t in columns["text"]]}, schema=SHARD_SCHEMA)
        tmp = atomic_path(output_dir / name)
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
        os.replace(tmp, output_dir / name)
        entries.append(
            {
                "path": name,
                "rows": len(part),
                "bytes": (output_dir / name).stat().st_size,
                "sha256": sha256_file(output_dir / name),
                "bucket_counts": {str(b): c for b, c in sorted(Counter(r["bucket"] for r in part).items())},
            }
        )
    for stale in output_dir.glob("shard-*.parquet"):  # from an earlier run that made more shards
        if stale.name not in {e["path"] for e in entries}:
            stale.unlink()
    return entries


def build_curriculum(
    inputs: list[str],
    output_dir: str | Path,
    config: CurriculumConfig | None = None,
    log: logging.Logger | None = logger,
) -> StageStats:
    config = config or CurriculumConfig()
    config.check()
    started = time.monotonic()
    output_dir = Path(output_dir)
    ledger = Ledger(STAGE)
    docs: list[Document] = []
    scores: list[float] = []
    for record in track(
        read_documents(inputs, config.reader), desc=f"{STAGE}: read", total=count_records(inputs), log=log
    ):
        if not isinstance(record, Document):
            ledger.rejected(record)
            continue
        score = record.metadata.get("quality_score")
        if score is None:
            ledger.dropped(record.id, "malformed", "no quality_score (not a scored_documents output)", record.location)
            continue
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            ledger.dropped(
                record.id, "malformed", f"quality_score {score!r:.40} is not a finite number", record.location
            )
            continue
        docs.append(record)
        scores.append(float(score))
    if not docs:
        raise ValueError(f"{STAGE}: no scored documents in {', '.join(inputs)}: nothing to shard")

    signal = SIGNALS[config.difficulty]
    difficulty = np.array([signal(d.text) for d in track(docs, desc=f"{STAGE}: {config.difficulty}", log=log)])
    quality = np.asarray(scores, dtype=np.float32)
    q_tier, d_tier = tiers(quality, config.n_quality_tiers), tiers(difficulty, config.n_difficulty_tiers)
    bucket_of = {qd: b for b, qd in enumerate(bucket_order(config))}
    bucket = np.array([bucket_of[(int(q), int(d))] for q, d in zip(q_tier, d_tier)], dtype=np.int16)
    within = [hashlib.blake2b(f"{config.seed}:{d.id}".encode(), digest_size=8).digest() for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (int(bucket[i]), within[i]))

    rows = [
        {
            "id": docs[i].id,
            "text": docs[i].text,
            "source": docs[i].source,
            "quality_score": float(quality[i]),
            "bucket": int(bucket[i]),
            "difficulty": float(np.float32(difficulty[i])),
        }
        for i in order
    ]
    manifest_shards = write_shard_files(rows, output_dir, config.target_shard_bytes, config.row_group_rows)

    buckets = []
    for b, (q, d) in enumerate(bucket_order(config)):
        members = bucket == b
        buckets.append(
            {
                "bucket": b,
                "quality_tier": q,
                "difficulty_tier": d,
                "rows": int(members.sum()),
                "quality_min": round(float(quality[members].min()), 4) if members.any() else None,
                "quality_max": round(float(quality[members].max()), 4) if members.any() else None,
                "difficulty_min": round(float(difficulty[members].min()), 4) if members.any() else None,
                "difficulty_max": round(float(difficulty[members].max()), 4) if members.any() else None,
            }
        )
    manifest = {
        "shards": manifest_shards,
        "buckets": buckets,
        "n_rows": len(docs),
        "config": {k: v for k, v in asdict(config).items() if k != "reader"},
        "code_version": code_version(),
        "schema": [f"{f.name}: {f.type}" for f in SHARD_SCHEMA],
    }
    tmp = atomic_path(output_dir / MANIFEST_FILE)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, output_dir / MANIFEST_FILE)

    for doc in docs:
        ledger.kept(doc)
    bytes_in = sum(len(d.text.encode("utf-8")) for d in docs)
    extra = {"n_shards": len(manifest_shards), "bucket_rows": {str(b["bucket"]): b["rows"] for b in buckets}}
    return finish_stage(output_dir, ledger, started, bytes_in=bytes_in, bytes_kept=bytes_in, extra=extra)


VERSIONS_DIR = "versions"


@dataclass(slots=True)
class Version:
    """A version of the shards under `root/versions/vNNNN/`: its number, and whether this build made it."""

    number: int
    folder: Path
    new: bool
    stats: StageStats


def versions(root: str | Path) -> list[Path]:
    """The complete versions under root (a folder with its manifest), oldest first."""
    found = [p for p in (Path(root) / VERSIONS_DIR).glob("v[0-9][0-9][0-9][0-9]") if (p / MANIFEST_FILE).exists()]
    return sorted(found)


def _content(folder: Path) -> tuple:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    return [s["sha256"] for s in manifest["shards"]], manifest["config"]


def build_curriculum_version(
    inputs: list[str], root: str | Path, config: CurriculumConfig | None = None, log: logging.Logger | None = logger
) -> Version:
    """Build the shards of `inputs` as a new version under `root/versions/vNNNN/` (a folder that ShardReader reads on
    its own), unless they equal the latest version's, which is then kept. `root/manifest.json` becomes the chosen
    version's manifest with its shard paths relative to root (`versions/vNNNN/shard-...`), so readers of root read
    the latest version and older versions stay readable where they are. The ledger and stats of the version are
    copied beside it."""
    root = Path(root)
    done = versions(root)
    number = int(done[-1].name[1:]) + 1 if done else 1
    folder = root / VERSIONS_DIR / f"v{number:04d}"
    stats = build_curriculum(inputs, folder, config, log)
    new = not done or _content(folder) != _content(done[-1])
    if not new:  # the same shards as the latest version: no new version
        shutil.rmtree(folder)
        number, folder = number - 1, done[-1]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    prefix = folder.relative_to(root).as_posix()
    manifest["shards"] = [{**s, "path": f"{prefix}/{s['path']}"} for s in manifest["shards"]]
    manifest["version"] = number
    manifest["versions"] = [p.relative_to(root).as_posix() for p in versions(root)]
    for name, content in ((LEDGER_FILE, (folder / LEDGER_FILE).read_bytes()),
                          (STATS_FILE, (folder / STATS_FILE).read_bytes()),
                          (MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True).encode())):  # fmt: skip
        tmp = atomic_path(root / name)
        tmp.write_bytes(content)
        os.replace(tmp, root / name)
    if log is not None:
        log.info(f"{STAGE}: version {number} ({'new' if new else 'unchanged'}) in {folder}")
    return Version(number, folder, new, stats)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    defaults = CurriculumConfig()
    parser.add_argument("--difficulty", choices=DIFFICULTY_SIGNALS, default=defaults.difficulty)
    parser.add_argument("--order", choices=ORDERS, default=defaults.order)
    parser.add_argument("--quality-tiers", type=int, default=defaults.n_quality_tiers)
    parser.add_argument("--difficulty-tiers", type=int, default=defaults.n_difficulty_tiers)
    parser.add_argument("--target-shard-mb", type=float, default=defaults.target_shard_bytes / 2**20)
    args = parser.parse_args(argv)
    config = CurriculumConfig(
        difficulty=args.difficulty,
        order=args.order,
        n_quality_tiers=args.quality_tiers,
        n_difficulty_tiers=args.difficulty_tiers,
        target_shard_bytes=int(args.target_shard_mb * 2**20),
        reader=reader_config(args),
    )
    return run_stage(build_curriculum, args.input, args.output, config)


if __name__ == "__main__":
    raise SystemExit(main())
