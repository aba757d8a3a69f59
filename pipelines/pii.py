"""PII redaction for clean_documents: e-mail addresses, IP addresses and phone numbers become placeholders.

E-mails and IPs use datatrove's PIIFormatter (its patterns, its validator, which leaves private and reserved
IP addresses alone, and its placeholders: example.com addresses and unrouted IPs), so the text still reads
naturally for a language model. datatrove has no phone pattern; phone numbers of the common written forms
(+CC, area code in brackets or not, separated by spaces, dots or dashes; 10-15 digits) become 555-0100, the
number reserved for fiction. Counts per kind are returned, for the document's metadata and the ledger.
"""

from __future__ import annotations

import re

from datatrove.pipeline.formatters import PIIFormatter

KINDS = ("email", "ip", "phone")
_PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])")
PHONE_PLACEHOLDER = "555-0100"


class PIIRedactor:
    """`redact(text)` -> (text with placeholders, {kind: replacements}) for the configured kinds."""

    def __init__(self, kinds: tuple[str, ...] = KINDS):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(KINDS)}")
        self.kinds = kinds
        formatter = PIIFormatter()
        self._replacers = {"email": formatter.emails_replacer, "ip": formatter.ip_replacer}

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts = dict.fromkeys(self.kinds, 0)
        for kind in self.kinds:
            if kind == "phone":
                text = _PHONE.sub(lambda m: self._phone(m, counts), text)
                continue
            replacer = self._replacers[kind]
            valid = replacer.validator or (lambda _: True)
            counts[kind] = sum(1 for m in replacer.regex.finditer(text) if valid(m.group(0)))
            if counts[kind]:
                # datatrove's replacer rotates through its placeholders across calls; starting each document at
                # the first makes a document's clean text its own, whatever was redacted before it in the same
                # process (else exact dedup misses copies that land in different batches)
                replacer._replace_i = 0
                text = replacer.replace(text)
        return text, counts

    @staticmethod
    def _phone(match: re.Match, counts: dict[str, int]) -> str:
        if not 10 <= sum(c.isdigit() for c in match.group(0)) <= 15:
            return match.group(0)
        counts["phone"] += 1
        return PHONE_PLACEHOLDER
