"""Progress for long stages: a tqdm bar on a terminal, and log lines (e.g. Dagster's step log)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def track(
    items: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    log: logging.Logger | None = None,
    unit: str = "doc",
    log_every_s: float = 5.0,
) -> Iterator[T]:
    """Yield `items`, showing a bar when stderr is a terminal and logging a line every `log_every_s`
    seconds (and at the end) to `log`, which may be any object with an `info(str)` method."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), dynamic_ncols=True)
    start = last = time.monotonic()
    n = 0
    with bar:
        for item in items:
            yield item
            n += 1
            bar.update(1)
            now = time.monotonic()
            if log is not None and now - last >= log_every_s:
                last = now
                of_total = f"/{total}" if total else ""
                log.info(f"{desc}: {n}{of_total} {unit}s, {n / (now - start):.0f} {unit}s/s")
    if log is not None:
        elapsed = max(time.monotonic() - start, 1e-9)
        log.info(f"{desc}: done, {n} {unit}s in {elapsed:.1f} s ({n / elapsed:.0f} {unit}s/s)")
