"""The worker pool of a preprocessing run, its progress reports and the workers' memory figures."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import resource
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

# Set in each worker process (or in the main process when running inline): where progress
# (rows) is reported, and the event that tells workers to stop after a failure elsewhere.
_PROGRESS: Any = None
_ABORT: Any = None


class _Aborted(Exception):
    """Raised in a worker when another part failed (its error is the one reported)."""


def _init_worker(progress_queue: Any, abort_event: Any) -> None:
    global _PROGRESS, _ABORT
    _PROGRESS, _ABORT = progress_queue, abort_event


def report(rows: int) -> None:
    """Reports ``rows`` processed to the progress bar; raises in a worker told to stop."""
    if _ABORT is not None and _ABORT.is_set():
        raise _Aborted
    if _PROGRESS is not None and rows:
        _PROGRESS.put(rows)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (for a forked worker: since the fork server,
    whose imports, torch included, it shares)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mb() -> float | None:
    """Current resident memory of this process (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _InlineProgress:
    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, rows: int) -> None:
        self.bar.update(rows)


class Workers:
    """Runs jobs in this process (workers <= 1) or in one process pool reused by every phase.

    The pool uses the 'forkserver' start method with the preprocess package preloaded: workers
    start clean (no threads or locks inherited from torch or arrow in the caller) and the import
    of mlet_dist.data (a few seconds, it loads torch) is paid once, by the fork server.
    """

    def __init__(self, workers: int, progress: bool) -> None:
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None
        self._abort: Any = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__package__])  # mlet_dist.data.preprocess: every job
            self._queue, self._abort = ctx.Queue(), ctx.Event()
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self._queue, self._abort),
            )
        return self._pool

    def run(
        self, fn: Callable[..., Any], jobs: list[tuple], desc: str, total: int | None = None
    ) -> list[Any]:
        """``[fn(*job) for job in jobs]``, in parallel; rows reported by the jobs on a bar (of
        ``total`` rows, with its ETA, when known)."""
        global _PROGRESS, _ABORT
        bar = tqdm(
            desc=desc,
            total=total,
            unit="rows",
            unit_scale=True,
            disable=not self.progress or not jobs,
            mininterval=1.0,
            smoothing=0.1,
        )
        with bar:
            if self.workers <= 1 or len(jobs) <= 1:
                saved = (_PROGRESS, _ABORT)
                _PROGRESS, _ABORT = _InlineProgress(bar), None
                try:
                    return [fn(*job) for job in jobs]
                finally:
                    _PROGRESS, _ABORT = saved
            pool = self._start()

            def drain() -> None:
                with contextlib.suppress(queue.Empty):
                    while True:
                        bar.update(self._queue.get_nowait())

            futures = [pool.submit(fn, *job) for job in jobs]
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    drain()
                    for future in done:
                        if future.exception() is not None:
                            raise future.exception()  # type: ignore[misc]
            except BaseException:
                # Running parts stop at their next chunk; queued ones are cancelled.
                self._abort.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                raise
            drain()
            return [f.result() for f in futures]
