"""Frugal corpus curation: plain functions over documents, one module and one CLI per stage.

Stages: ingest (raw_documents) -> clean (clean_documents) -> near_dedup (near_dedup_documents);
every stage writes `documents.parquet`, `ledger.parquet` and `stats.json` into its output folder.
"""
