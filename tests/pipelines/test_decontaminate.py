"""Decontamination: a document that copies a 13-word passage of an evaluation file (whatever its case,
punctuation or line breaks) is dropped as contaminated:<file>; 12 shared words are not a copy."""

import pyarrow.parquet as pq
import pytest

from pipelines.decontaminate import EvalNgrams
from pipelines.filters import FilterConfig, filter_documents
from tests.conftest import write_jsonl
from tests.pipelines.test_filters import ENGLISH

PASSAGE = (
    "The lighthouse keeper climbed the hundred and twelve steps every evening to light the great lamp "
    "that warned the fishing boats away from the rocks."
)
QUESTIONS = [
    {"context": PASSAGE, "question": "How many steps did the keeper climb?", "choices": ["112", "100"], "answer": 0},
    {"context": "A short line.", "question": "Is it short?", "choices": ["yes", "no"], "answer": 0},
]


def test_a_copied_passage_is_dropped_naming_the_evaluation_file(tmp_path):
    evals = write_jsonl(tmp_path / "reading_eval.jsonl", QUESTIONS)
    words = PASSAGE.split()
    copied = ENGLISH + "\n\n" + " ".join(words[3:16]).upper().replace(" THE ", ",\nthe ") + ". " + ENGLISH
    near_miss = ENGLISH + " " + " ".join(words[3:15]) + " " + ENGLISH  # 12 words: not a copy
    rows = [{"id": "copied", "text": copied}, {"id": "near_miss", "text": near_miss}, {"id": "clean", "text": ENGLISH}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    config = FilterConfig(decontaminate=(str(evals),), workers=1, gopher_repetition=None, gopher_quality=None,
                          c4=None, fineweb=None)  # fmt: skip
    stats = filter_documents([str(src)], tmp_path / "out", config)
    assert stats.drop_reasons == {"contaminated:reading_eval.jsonl": 1}
    ledger = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()}
    assert ledger["copied"]["reason"] == "contaminated:reading_eval.jsonl"
    assert ledger["near_miss"]["outcome"] == ledger["clean"]["outcome"] == "kept"


def test_bad_evaluation_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.jsonl: evaluation file not found"):
        EvalNgrams((str(tmp_path / "missing.jsonl"),))
    short = tmp_path / "short.txt"
    short.write_text("too short to hold a passage")
    with pytest.raises(ValueError, match=r"short\.txt: no 13-word passage"):
        EvalNgrams((str(short),))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "fine"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: evaluation file is not JSONL"):
        EvalNgrams((str(broken),))
