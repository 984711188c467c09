"""Dynamic batching across requests: one worker thread, one queue.

Requests arrive on the server's event loop; the model lives on one worker
thread. ``Batcher.submit`` puts a ``Job`` (a request's texts, its search key and
its size in source subwords) in the queue and returns at once; the worker
takes the oldest job and groups it with the queued jobs of the same key (so
different search settings are never mixed), up to ``batch_tokens`` subwords,
and hands the group to ``process``, which decodes them
together and returns one result per job. Each result goes back through the
job's ``concurrent.futures.Future``, which the request awaits.

Waiting for company costs latency, so the worker waits (at most ``max_wait``
seconds after the oldest job arrived, or until ``batch_tokens`` subwords are
queued) only under concurrency: when its previous group held several jobs. A
lone client never waits; under load, what arrives while a group is decoded
forms the next group, and the short wait evens out the groups.

Bounded by construction: at most ``max_queue`` subwords wait (``submit``
raises ``QueueFull`` beyond), a job cancelled before it starts (its request
timed out, or its client went away) leaves the queue at once, and ``stop``
finishes what is queued before the worker ends (graceful shutdown).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` subwords already; the caller should retry later."""


@dataclass(eq=False)
class Job:
    """One request's work: ``payload`` for ``process``, batched with jobs of the same
    ``key``; ``size`` counts its source subwords."""

    key: Hashable
    size: int
    payload: Any
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the worker did: groups decoded, jobs in them, the largest group in jobs."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0


class Batcher:
    """Groups queued jobs by key and decodes each group on one worker thread."""

    def __init__(
        self,
        process: Callable[[list[Any]], list[Any]],
        batch_tokens: int = 2048,
        max_wait: float = 0.01,
        max_queue: int = 16384,
    ) -> None:
        """``process`` maps the payloads of one group to their results, in order
        (an exception fails every job of the group)."""
        self.process = process
        self.batch_tokens = batch_tokens
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: deque[Job] = deque()
        self._queued = 0  # subwords waiting
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy = False  # the last group held several jobs: more are likely to come

    # ---- the event loop's side ----------------------------------------------------
    def start(self) -> None:
        """Starts the worker (again, after ``stop``: an app may be started more than
        once, as test clients do); a no-op while it runs."""
        with self._changed:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="rosetta-batcher", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        """Subwords waiting (not yet being decoded)."""
        return self._queued

    def submit(self, key: Hashable, size: int, payload: Any) -> Job:
        """Queues a job; raises ``QueueFull`` when ``max_queue`` subwords would be
        waiting, and ``RuntimeError`` once ``stop`` was called."""
        job = Job(key, size, payload)
        with self._changed:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._queue and self._queued + size > self.max_queue:
                raise QueueFull(
                    f"{self._queued:,} subwords are waiting (max_queue {self.max_queue:,})"
                )
            self._queue.append(job)
            self._queued += size
            self._changed.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Takes a job that has not started out of the queue (True); a job being
        decoded finishes and its result is dropped (False)."""
        with self._changed:
            if not job.future.cancel():
                return False
            try:
                self._queue.remove(job)
                self._queued -= job.size
            except ValueError:
                pass  # the worker took it and will skip it
            self._changed.notify()
            return True

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new jobs, lets the worker finish every queued one, and joins it."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker's side ------------------------------------------------------------
    def _next_group(self) -> list[Job] | None:
        """Blocks until a group is ready (None: stopped with nothing queued)."""
        with self._changed:
            while True:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if not self._queue:
                    return None
                first = self._queue[0]
                same = sum(job.size for job in self._queue if job.key == first.key)
                wait = first.arrived + self.max_wait - time.monotonic()
                if self._stopping or same >= self.batch_tokens or wait <= 0 or not self._busy:
                    break
                self._changed.wait(wait)  # more jobs may come, or the first be cancelled
            group, size = [], 0
            for job in list(self._queue):
                if job.key != first.key or (group and size + job.size > self.batch_tokens):
                    continue
                self._queue.remove(job)
                self._queued -= job.size
                size += job.size
                if job.future.set_running_or_notify_cancel():
                    group.append(job)
            self._busy = len(group) > 1
            return group

    def _work(self) -> None:
        while (group := self._next_group()) is not None:
            if not group:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(group)
            self.stats.largest = max(self.stats.largest, len(group))
            try:
                results = self.process([job.payload for job in group])
            except Exception as error:  # each request reports it; the worker goes on
                for job in group:
                    job.future.set_exception(error)
                continue
            for job, result in zip(group, results):
                job.future.set_result(result)
