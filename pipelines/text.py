"""Text normalisation shared by cleaning and exact dedup."""

from __future__ import annotations

import re
import unicodedata

import ftfy

# C0/C1 control characters except tab and newline; also zero-width and BOM characters.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_HSPACE_RE = re.compile(r"[^\S\n]+")  # runs of white space other than newlines
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_FTFY_CONFIG = ftfy.TextFixerConfig(normalization="NFC", unescape_html=False, explain=False)


def normalize_text(text: str) -> str:
    """Repair mojibake (ftfy), NFC-normalise, drop control characters, tidy white space.

    White space: carriage returns become newlines, runs of other spaces become one space, lines lose
    their trailing spaces, three or more newlines become two, and the text is stripped. The result is
    what exact dedup hashes, so two documents that differ only in these respects are duplicates.
    """
    text = ftfy.fix_text(text.replace("\r\n", "\n").replace("\r", "\n"), _FTFY_CONFIG)
    text = unicodedata.normalize("NFC", _CONTROL_RE.sub("", text))
    lines = (_HSPACE_RE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()


HTML_CHROME_SELECTORS = ("#mdbook-help-container", "#sidebar", "#menu-bar", "nav")
"""Site chrome that resiliparse's main-content heuristic keeps: mdBook's keyboard-help box ("Keyboard shortcuts /
Press ← or → to navigate"), its sidebar and menu bar, and <nav> elements."""


def html_main_text(tree) -> str:
    """The main content of a parsed page (resiliparse HTMLTree) as plain text, without HTML_CHROME_SELECTORS."""
    from resiliparse.extract.html2text import extract_plain_text

    if tree.body is not None:
        for selector in HTML_CHROME_SELECTORS:
            for node in tree.body.query_selector_all(selector):
                node.parent.remove_child(node)
    return extract_plain_text(tree, main_content=True)
