"""Decontamination against evaluation sets: a document that shares a long word n-gram (13 words, as GPT-3 and
NeMo Curator use) with an evaluation file is dropped as `contaminated:<file name>`, so that a benchmark does
not score text the model trained on.

Evaluation files are JSONL (every string value of each row counts: a question, its choices, its answer, so any
lm-eval task's data works as it is) or plain text. Words are lower-cased runs of letters and digits, so case,
punctuation and line breaks do not hide a copy. Memory: one 8-byte hash per n-gram of the evaluation files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import xxhash

_WORD = re.compile(r"\w+")


def _ngram_hashes(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {xxhash.xxh3_64_intdigest(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def _eval_texts(path: str) -> list[str]:
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        if not path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")):
            return [f.read()]
        texts = []
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: evaluation file is not JSONL: {e}") from e
            texts.extend(_strings(row))
        return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class EvalNgrams:
    """The n-grams of a set of evaluation files; `contaminated_by(text)` names the first file a text shares
    one with, or None."""

    def __init__(self, files: tuple[str, ...], n: int = 13):
        if n < 3:
            raise ValueError(f"contamination n-gram length {n} is too short to mean a copy; use 8-13")
        self.n = n
        self.files = files
        self.hashes: dict[int, str] = {}
        for path in files:
            try:
                texts = _eval_texts(path)
            except FileNotFoundError as e:
                raise ValueError(f"{path}: evaluation file not found") from e
            name = Path(path).name
            found = set().union(*(_ngram_hashes(t, n) for t in texts)) if texts else set()
            if not found:
                raise ValueError(f"{path}: no {n}-word passage in this evaluation file to decontaminate against")
            for h in found:
                self.hashes.setdefault(h, name)

    def contaminated_by(self, text: str) -> str | None:
        words = _WORD.findall(text.lower())
        for i in range(len(words) - self.n + 1):
            name = self.hashes.get(xxhash.xxh3_64_intdigest(" ".join(words[i : i + self.n])))
            if name is not None:
                return name
        return None
