"""Building blocks for asset metadata: Markdown tables of the project's own figures, text tables of corpus
content, embedded PNG plots.

Corpus text is data, never markup. The Dagster UI renders Markdown metadata, so a document holding
`![badge](https://...)` would make every viewer's browser fetch that URL, and raw HTML would be shown as HTML.
Anything that comes from a document (text, ids, sources, tokens) therefore goes into `text_table`, whose cells
the UI shows as literal text; `md_table` is for figures and names the project writes itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from model.io import atomic_file, md_table
from pipelines.stage import StageStats


def text_table(columns: Sequence[str], rows: Sequence[Sequence]) -> dg.TableMetadataValue:
    """A table whose cells the Dagster UI shows as literal strings: for anything taken from a document."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, "string") for name in columns])
    records = [dg.TableRecord({name: str(v) for name, v in zip(columns, row)}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def drop_reason_rows(stats: StageStats) -> list[tuple[str, int, str]]:
    n = max(stats.n_in, 1)
    return [(reason, count, f"{100 * count / n:.1f}%") for reason, count in stats.drop_reasons.items()]


def preview_rows(path: Path, n: int = 5, chars: int = 160) -> list[tuple[str, str, str]]:
    table = pq.ParquetFile(path).read_row_group(0, columns=["id", "source", "text"]) if path.exists() else None
    if table is None or table.num_rows == 0:
        return []
    return [(r["id"], r["source"], r["text"][:chars]) for r in table.slice(0, n).to_pylist()]


def png_md(path: Path, alt: str) -> str:
    """A PNG embedded in Markdown, so the Dagster UI shows the picture itself."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


INLINE_MD_CHARS = 1000
"""The Dagster UI shows a Markdown metadata value inline when it is shorter than this, and behind a [Show Markdown]
dialog otherwise; a full plot (a data: PNG of tens of kB) always goes behind the dialog."""


def sparkline_md(values, alt: str, kind: str = "bars", log: bool = False, size: tuple[int, int] = (180, 36)) -> str:
    """A 1-bit PNG thumbnail of `values` (bars, or a line) as inline Markdown, short enough for the UI to show on
    the asset's page (INLINE_MD_CHARS); the full plot with its axes stays in its own entry."""
    import io
    import math

    from PIL import Image, ImageDraw

    width, height = size
    v = [math.log10(1 + x) if log else float(x) for x in values]
    top, low = max(v, default=1.0), min(v, default=0.0) if kind == "line" else 0.0
    span = (top - low) or 1.0
    image = Image.new("1", size, 1)
    draw = ImageDraw.Draw(image)
    if kind == "bars":
        step = width / max(len(v), 1)
        for i, x in enumerate(v):
            draw.rectangle([i * step + 1, height - 1 - (height - 2) * (x - low) / span, (i + 1) * step - 2, height - 1],
                           fill=0)  # fmt: skip
    else:
        step = (width - 1) / max(len(v) - 1, 1)
        points = [(i * step, height - 2 - (height - 4) * (x - low) / span) for i, x in enumerate(v)]
        draw.line(points, fill=0, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    md = f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"
    if len(md) >= INLINE_MD_CHARS and width > 60:  # a long noisy line: a narrower picture
        return sparkline_md(values, alt, kind, log, (width // 2, height))
    return md


def bar_chart_png(counts: Mapping[str, int], path: Path, title: str, xlabel: str, ylabel: str = "count") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.bar(list(counts.keys()), list(counts.values()), color="#4c72b0")
    ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=f"{ylabel} (log)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def column_schema(schema) -> dg.TableSchema:
    """A Parquet (pyarrow) schema as Dagster's column schema (`dagster/column_schema`)."""
    columns = [
        dg.TableColumn(f.name, str(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable)) for f in schema
    ]
    return dg.TableSchema(columns=columns)


def rounded(value, digits: int = 4):
    """Floats in metadata to `digits` significant digits (in dicts and lists too): 0.0312 rather than
    0.031249999999999997."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dg.FloatMetadataValue) and value.value is not None:
        return dg.MetadataValue.float(rounded(value.value, digits))
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return [rounded(v, digits) for v in value] if isinstance(value, list) else value


def stage_metadata(stats: StageStats, documents: Path) -> dict:
    """The metadata every curation asset shows: counts, drop reasons, a preview of documents, Dagster's row count
    and column schema; the stage's own figures (stats.json) that no other entry shows."""
    schema = pq.read_schema(documents) if documents.exists() else None
    return {
        "dagster/row_count": stats.n_kept,
        "dagster/column_schema": column_schema(schema) if schema is not None else None,
        "n_in": stats.n_in,
        "n_kept": stats.n_kept,
        "n_dropped": stats.n_dropped,
        "mb_kept": round(stats.bytes_kept / 1e6, 3),
        "seconds": stats.seconds,
        "docs_per_second": round(stats.n_in / max(stats.seconds, 1e-9), 1),
        "drop_reasons": dg.MetadataValue.md(
            md_table(("reason", "documents", "share of input"), drop_reason_rows(stats))
        ),
        "preview": text_table(("id", "source", "text"), preview_rows(documents)),
        "path": dg.MetadataValue.path(str(documents)),
        "stats": dg.MetadataValue.json(rounded(json.loads(json.dumps(stats.extra)))) if stats.extra else None,
    }
