"""The Document and ledger records that flow between curation stages, and their Parquet schemas."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

KEPT = "kept"
DROPPED = "dropped"

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # a JSON object, so any keys survive Parquet
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the document id, or FILE:LINE when it had none
        pa.field("stage", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # "kept" or "dropped"
        pa.field("reason", pa.string(), nullable=False),  # "" when kept
        pa.field("detail", pa.string(), nullable=False),  # human-readable why, e.g. the duplicate kept
        pa.field("location", pa.string(), nullable=False),  # FILE:LINE (or FILE:row N) of the input
        pa.field("partition", pa.string(), nullable=False),  # the input drop ("" outside a partitioned run)
        pa.field("duplicate_of", pa.string(), nullable=False),  # a duplicate's kept document
        pa.field("duplicate_partition", pa.string(), nullable=False),  # and the drop that holds it
    ]
)


@dataclass(slots=True)
class Document:
    """One document: a unique `id`, its `text`, the `source` it came from, free-form `metadata`."""

    id: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)
    location: str = ""  # where the stage read it (FILE:LINE), for error messages and the ledger

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True),
        }


@dataclass(slots=True)
class Rejected:
    """An input record that cannot become a Document: it goes to the ledger as dropped."""

    ledger_id: str
    reason: str  # "malformed", "empty" or "oversize"
    detail: str
    location: str


@dataclass(slots=True)
class LedgerRow:
    id: str
    stage: str
    outcome: str
    reason: str = ""
    detail: str = ""
    location: str = ""
    partition: str = ""
    duplicate_of: str = ""
    duplicate_partition: str = ""


class Ledger:
    """The rows of one stage (of one input drop, `partition`): one per input record, each kept or dropped with a
    reason."""

    def __init__(self, stage: str, partition: str = ""):
        self.stage = stage
        self.partition = partition
        self.rows: list[LedgerRow] = []

    def kept(self, doc: Document, detail: str = "") -> None:
        self.rows.append(LedgerRow(doc.id, self.stage, KEPT, "", detail, doc.location, self.partition))

    def dropped(
        self,
        ledger_id: str,
        reason: str,
        detail: str = "",
        location: str = "",
        duplicate_of: str = "",
        duplicate_partition: str = "",
    ) -> None:
        """duplicate_of, duplicate_partition: for a duplicate, the document kept in its place and its drop."""
        self.rows.append(LedgerRow(ledger_id, self.stage, DROPPED, reason, detail, location, self.partition,
                                   duplicate_of, duplicate_partition))  # fmt: skip

    def rejected(self, rej: Rejected) -> None:
        self.dropped(rej.ledger_id, rej.reason, rej.detail, rej.location)

    def to_table(self) -> pa.Table:
        columns = {name: [getattr(r, name) for r in self.rows] for name in LEDGER_SCHEMA.names}
        return pa.Table.from_pydict(columns, schema=LEDGER_SCHEMA)


def kept_by_source(stage_ledgers: dict[str, pa.Table], source_of: dict[str, str], max_sources: int = 12) -> list[dict]:
    """Per source, its input count and how many of its documents are still kept after each stage, in stage
    order (the first ledger's rows are the input). A document's source is `source_of[id]`, else the input file
    of its first ledger row (documents dropped on reading have no source yet). Past `max_sources`, the
    smallest sources are summed as "(other)"."""
    stages = list(stage_ledgers)
    first = stage_ledgers[stages[0]]
    group = {}
    for doc_id, location in zip(first["id"].to_pylist(), first["location"].to_pylist()):
        group[doc_id] = source_of.get(doc_id) or location.rpartition(":")[0] or "(unknown)"
    sizes: dict[str, int] = {}
    for g in group.values():
        sizes[g] = sizes.get(g, 0) + 1
    named = sorted(sizes, key=lambda g: (-sizes[g], g))[:max_sources]
    if len(sizes) > max_sources:
        group = {i: (g if g in named else "(other)") for i, g in group.items()}
        named.append("(other)")
    rows = {g: {"source": g, "input": 0, **dict.fromkeys(stages, 0)} for g in named}
    for g in group.values():
        rows[g]["input"] += 1
    for stage, table in stage_ledgers.items():
        for doc_id, outcome in zip(table["id"].to_pylist(), table["outcome"].to_pylist()):
            if outcome == KEPT and doc_id in group:
                rows[group[doc_id]][stage] += 1
    return [rows[g] for g in named]
