"""Frugal training: the data loader over curated shards so far; the DeepSpeed engine and loop follow."""
