"""Frugal corpus curation: plain functions over documents, one module and one CLI per stage.

Stages: ingest (raw_documents) -> clean (clean_documents: normalisation, exact dedup) -> near_dedup
(near_dedup_documents: MinHash LSH, in-house or on datatrove) -> filters (filtered_documents: language ID and
heuristics) -> quality_score (scored_documents, with the fastText model from `quality`) -> curriculum
(curriculum_shards: Parquet shards by quality and difficulty, with manifest.json). Every stage writes
`documents.parquet`, `ledger.parquet` (one row per input record, kept or dropped with a reason) and
`stats.json` into its output folder, each file atomically. `readers` reads JSONL, Parquet and WARC; bad input
is a ledger row or an `InputError` naming the file and line. `sample_corpus` builds the embedded demo corpus.
"""
