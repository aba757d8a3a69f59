"""Ordered parallel map over batches with bounded memory, on the cores of one machine or on a Ray cluster.

multiprocessing.Pool.imap reads its whole input ahead; this keeps at most `window` batches in
flight, so a stage streams. Workers start with forkserver (datatrove's choice too): callers that run
as scripts must guard `if __name__ == "__main__"`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def workers_for(workers: int, n_documents: int | None, inline_below: int) -> int:
    """The workers a stage uses for `n_documents` inputs (None: unknown, so `workers`): below `inline_below` it runs
    inline. Starting the workers (a forkserver, then each worker importing the stage's libraries) costs about half a
    second to a second, more than they save on a small input such as one day's drop; each stage sets its own
    threshold from its cost per document (bench/dedup_incremental.py)."""
    return 1 if n_documents is not None and n_documents < inline_below else workers


def _terminable() -> None:
    """A worker dies on SIGTERM whatever its parent ignored (a stage started under nohup, or in the background
    of a non-interactive shell, hands its ignored signals down): Pool.terminate relies on it, and a worker left
    blocked would keep the stage's output pipes open after the stage has exited."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pool(workers: int, ray_address: str | None):
    """`workers` local processes, or with `ray_address` (a running cluster: host:port, ray://..., or "auto") that many
    Ray actors behind Ray's drop-in multiprocessing.Pool."""
    if ray_address is not None:
        from ray.util.multiprocessing import Pool as RayPool

        return RayPool(processes=workers, ray_address=ray_address)
    return multiprocessing.get_context("forkserver").Pool(workers, initializer=_terminable)


def ordered_map(
    fn: Callable[[P], R],
    items: Iterable[T],
    payload: Callable[[T], P],
    workers: int,
    window: int | None = None,
    ray_address: str | None = None,
) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(payload(item))) in input order; fn runs in `workers` processes (inline if 1 and no Ray), or
    on the Ray cluster at `ray_address`.

    Only the payload crosses the process boundary, so items may hold unpicklable or large parts.
    """
    if workers <= 1 and ray_address is None:
        for item in items:
            yield item, fn(payload(item))
        return
    window = window or 4 * workers
    with _pool(workers, ray_address) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(fn, (payload(item),))))
            if len(pending) >= window:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def map_documents(
    fn: Callable[[list[str]], list[R]],
    records: Iterable,
    on_rejected: Callable,
    workers: int,
    batch_docs: int,
    ray_address: str | None = None,
) -> Iterator[tuple]:
    """Yield (document, result) in input order, where results come from fn over batches of document
    texts run in `workers` processes (or Ray actors, see `ordered_map`); records that are not Documents go to
    `on_rejected` instead."""
    from pipelines.document import Document

    batches = ordered_map(
        fn,
        batched(records, batch_docs),
        payload=lambda batch: [r.text for r in batch if isinstance(r, Document)],
        workers=workers,
        ray_address=ray_address,
    )
    for batch, results in batches:
        result_iter = iter(results)
        for record in batch:
            if isinstance(record, Document):
                yield record, next(result_iter)
            else:
                on_rejected(record)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
