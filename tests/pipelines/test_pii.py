"""PII redaction: planted e-mails, IPs and phone numbers become placeholders and are counted; look-alikes
(private IPs, versions, dates, ISBNs) stay."""

import json

import pyarrow.parquet as pq
import pytest

from pipelines.clean import CleanConfig, clean
from pipelines.pii import PHONE_PLACEHOLDER, PIIRedactor
from tests.conftest import prose, write_jsonl

PLANTED = (
    "Write to jane.doe@corp.example.net or ops+alerts@mail.co.uk, call +1 (415) 555-2671 or 020 7946 0958. "
    "The server at 8.8.8.8 mirrors 1.1.1.1."
)
LOOK_ALIKES = "Python 3.11.7 on 192.168.1.4 and 10.0.0.1, released 2026-12-01, ISBN 978-3-16-148410-0, port 8080."


def test_planted_pii_is_replaced_and_counted():
    text, counts = PIIRedactor().redact(PLANTED)
    assert counts == {"email": 2, "ip": 2, "phone": 2}
    for secret in ("jane.doe", "ops+alerts", "555-2671", "7946 0958", "8.8.8.8", "1.1.1.1"):
        assert secret not in text
    assert text.count(PHONE_PLACEHOLDER) == 2 and "@example." in text


def test_a_documents_placeholders_do_not_depend_on_what_was_redacted_before():
    """Copies of a document whose e-mails differ must clean to the same text in any batch, or exact dedup misses
    them (datatrove's replacer alone rotates its placeholders across calls)."""
    redactor = PIIRedactor()
    alone = PIIRedactor().redact(PLANTED)
    redactor.redact("one more address: someone@corp.example.net")
    assert redactor.redact(PLANTED) == alone
    copy = PLANTED.replace("jane.doe@corp", "john.roe@other").replace("ops+alerts", "x")
    assert redactor.redact(copy)[0] == alone[0]


def test_look_alikes_stay():
    assert PIIRedactor().redact(LOOK_ALIKES) == (LOOK_ALIKES, {"email": 0, "ip": 0, "phone": 0})


def test_only_the_chosen_kinds_are_redacted():
    text, counts = PIIRedactor(("email",)).redact(PLANTED)
    assert counts == {"email": 2} and "8.8.8.8" in text and "555-2671" in text
    with pytest.raises(ValueError, match="unknown PII kinds"):
        PIIRedactor(("ssn",))


def test_the_clean_stage_redacts_counts_and_ledgers(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "pii", "text": prose(1, 60) + " " + PLANTED},
        {"id": "plain", "text": prose(2, 60)},
    ])  # fmt: skip
    stats = clean([str(src)], tmp_path / "out", CleanConfig(workers=1))
    assert stats.extra["pii_redacted"] == {"email": 2, "ip": 2, "phone": 2}
    docs = {d["id"]: d for d in pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist()}
    assert "jane.doe" not in docs["pii"]["text"]
    assert json.loads(docs["pii"]["metadata"])["pii"] == {"email": 2, "ip": 2, "phone": 2}
    assert "pii" not in json.loads(docs["plain"]["metadata"])
    ledger = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()}
    assert ledger["pii"]["detail"] == "pii:email=2 pii:ip=2 pii:phone=2" and ledger["plain"]["detail"] == ""
    off = clean([str(src)], tmp_path / "off", CleanConfig(workers=1, redact_pii=()))
    assert off.extra["pii_redacted"] == {}
    assert any("jane.doe" in t for t in pq.read_table(tmp_path / "off" / "documents.parquet")["text"].to_pylist())
