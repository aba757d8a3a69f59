import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines.filters import DocumentFilter, FilterConfig, WhitespaceWordTokenizer, filter_documents
from tests.conftest import write_jsonl

ENGLISH = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, the members "
    "agreed that the library should receive more money for books and for longer opening hours. They also asked the "
    "city to repair the roof of the old school, which has leaked every winter since it was built. The mayor said "
    "that the plan was sensible and that she would present it to the council next month. Several residents spoke "
    "in favour of the proposal, and one of them read a letter from the children of the local school. "
)
GERMAN = (
    "Der Ausschuss traf sich am Dienstag, um den Haushalt für das kommende Jahr zu besprechen. Nach einer langen "
    "Diskussion waren sich die Mitglieder einig, dass die Bibliothek mehr Geld für Bücher erhalten sollte. "
) * 3
KEYWORDS = ", ".join(["cheap flights", "best deals", "buy now", "discount"] * 40)


def test_language_and_heuristics_decide_with_reasons():
    results = DocumentFilter(FilterConfig())([ENGLISH, GERMAN, KEYWORDS])
    assert results[0][0] is None and results[0][2]["language"] == "en"
    assert results[1][0] == "language:de"
    assert results[2][0].startswith("heuristic:gopher_")


# command references a machine always has: the --help of Python's own command-line modules (prose and options)
HELP_MODULES = ("http.server", "json.tool", "zipfile", "unittest", "pydoc", "venv", "timeit", "trace", "calendar",
                "ast", "compileall", "gzip", "pdb")  # fmt: skip


def help_text(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert len(out.stdout.split()) >= 30, (module, out.stderr)
    return out.stdout


def test_technical_english_is_judged_english_by_its_paragraphs():
    """Option lists pull the whole-text score of a clearly English help page under 0.65; the paragraph vote
    keeps every page, and keeps the whole-text score in the metadata."""
    texts = [help_text(m) for m in HELP_MODULES]
    by_paragraph = DocumentFilter(FilterConfig(language_by="paragraphs")).language(texts)
    by_document = DocumentFilter(FilterConfig(language_by="document")).language(texts)
    assert all(m["language"] == "en" and m["language_score"] >= 0.65 for m in by_paragraph), by_paragraph
    assert sum(m["language_score"] < 0.65 for m in by_document) >= 6  # what the whole text gives them
    assert [m["language_score_document"] for m in by_paragraph] == [m["language_score"] for m in by_document]


def test_a_wanted_language_with_too_low_a_score_says_so():
    """A page that is nearly all option names (tarfile's help: one sentence of prose) is English, but not
    clearly: its reason names the language and the threshold, unlike a language that was not asked for."""
    [(reason, _, meta)] = DocumentFilter(FilterConfig())([help_text("tarfile")])
    assert meta["language"] == "en" and meta["language_score"] < 0.65
    assert reason == "language_score:en<0.65"
    mixed = GERMAN + "\n\n" + ENGLISH[:200]  # mostly German paragraphs: German, not English
    assert DocumentFilter(FilterConfig())([mixed])[0][0] == "language:de"
    with pytest.raises(ValueError, match="language_by"):
        DocumentFilter(FilterConfig(language_by="lines"))


def test_a_switched_off_filter_is_not_applied():
    short = "The library opens at nine and closes at six. Children are welcome to read with their parents."
    on = DocumentFilter(FilterConfig(gopher_repetition=None))([short])[0][0]
    assert on == "heuristic:gopher_quality.gopher_short_doc"
    off = DocumentFilter(FilterConfig(gopher_repetition=None, gopher_quality=None, c4=None, fineweb=None))([short])[0][
        0
    ]
    assert off is None


def test_rules_are_configured_by_datatrove_parameters():
    short = "The library opens at nine and closes at six. Children are welcome to read with their parents."
    config = FilterConfig(gopher_repetition=None, gopher_quality={"min_doc_words": 10}, c4=None, fineweb=None)
    assert DocumentFilter(config)([short])[0][0] is None
    with pytest.raises(ValueError, match="filter gopher_quality"):
        DocumentFilter(FilterConfig(gopher_quality={"no_such_rule": 1}))


def test_unloadable_language_model_names_the_file(tmp_path):
    bad = tmp_path / "lid.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"lid\.bin"):
        DocumentFilter(FilterConfig(lid_model=str(bad)))


def test_stage_ledgers_drops_and_keeps_language_metadata(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "en", "text": ENGLISH}, {"id": "de", "text": GERMAN}, {"id": "kw", "text": KEYWORDS}],
    )
    stats = filter_documents([str(src)], tmp_path / "out", FilterConfig(workers=1))
    assert (stats.n_in, stats.n_kept) == (3, 1)
    assert "language:de" in stats.drop_reasons
    [kept] = pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    assert kept["id"] == "en" and '"language": "en"' in kept["metadata"]


def test_whitespace_tokenizer_words_and_sentences():
    tok = WhitespaceWordTokenizer("en")
    assert tok.word_tokenize("Call foo(), then bar.") == ["Call", "foo(),", "then", "bar."]
    assert tok.sent_tokenize("One here. Two there!\n\nThree") == ["One here.", "Two there!", "Three"]
