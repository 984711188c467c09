"""Batching across requests: one worker thread, one queue.

With a ``Stream`` (the service's continuous batching, ``rosetta.serve.stream``),
the worker runs the stream a decoding step at a time, and between two steps
queued jobs join it and cancelled ones leave it: a request's sentences start at
the next step and it is answered when its last one ends, whatever else is
running. Jobs the stream does not accept (or every job, without one) are
decoded in groups, as follows.

Requests arrive on the server's event loop; the model lives on one worker
thread. ``Batcher.submit`` puts a ``Job`` (a request's texts, its search key and
its size in source subwords) in the queue and returns at once; the worker
takes the oldest job and groups it with the queued jobs of the same key (so
different search settings are never mixed), up to ``batch_tokens`` subwords,
and hands the group to ``process``, which decodes them
together and returns one result per job. Each result goes back through the
job's ``concurrent.futures.Future``, which the request awaits.

Waiting for company costs latency, so the worker waits (at most ``max_wait``
seconds after it became free or the oldest job arrived, whichever is later, or
until ``batch_tokens`` subwords are queued) only under concurrency: when its
previous group held several jobs. A lone client never waits. Under load the
wait lets the clients just answered send their next requests in time to join
the group: without it, N busy clients settle into two alternating groups of
N/2 (one decoded while the other gathers), and small groups decode slower.

Bounded by construction: at most ``max_queue`` subwords wait (``submit``
raises ``QueueFull`` beyond), a job cancelled before it starts (its request
timed out, or its client went away) leaves the queue at once, and ``stop``
finishes what is queued before the worker ends (graceful shutdown).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` subwords already; the caller should retry later."""


class ModelThread:
    """One daemon thread that runs the callables given to ``submit`` in order: the
    thread that loads a model and then runs it. PyTorch's OpenMP threads serve the
    first thread that used them best (small matrix products ran at half speed from
    a second thread here). Unlike a ``ThreadPoolExecutor``'s, it never holds up the
    interpreter's exit."""

    def __init__(self, name: str = "rosetta-model") -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._tasks.put((future, function, args))
        return future

    def _run(self) -> None:
        while True:
            future, function, args = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:  # the caller gets it from the future
                future.set_exception(error)


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
    """What the worker did: groups decoded, jobs in them, the largest group in jobs;
    and of the stream, decoding steps and the jobs that went through it."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0
    steps: int = 0
    streamed: int = 0


class Stream(Protocol):
    """Work decoded a step at a time, which jobs join and leave between steps
    (continuous batching; the service's is ``rosetta.serve.stream``)."""

    def accepts(self, payload: Any) -> bool:
        """Whether a job of this payload can join the stream."""

    def open(self, job: Job) -> None:
        """The job's work joins (it may wait inside for room)."""

    def close(self, job: Job) -> bool:
        """Forgets a job (cancelled): its work leaves, no result comes; False if it
        was not open (it had finished)."""

    def step(self) -> list[tuple[Job, Any]]:
        """One step of everything open: the jobs it finished, with their results (an
        exception instead of a result fails that job)."""

    @property
    def busy(self) -> bool:
        """Whether some job is open."""

    @property
    def hungry(self) -> bool:
        """Whether it would take more work now (nothing waits inside)."""


class Batcher:
    """Groups queued jobs by key and decodes each group on one worker thread."""

    def __init__(
        self,
        process: Callable[[list[Any]], list[Any]],
        batch_tokens: int = 2048,
        max_wait: float = 0.01,
        max_queue: int = 16384,
        thread: ModelThread | None = None,
        stream: Stream | None = None,
    ) -> None:
        """``process`` maps the payloads of one group to their results, in order
        (an exception fails every job of the group). ``thread``: where the worker
        runs (default: a thread of its own); give the one the model was loaded on.
        ``stream``: where the jobs it accepts are decoded instead, joining and
        leaving between its steps."""
        self.process = process
        self.stream = stream
        self._dropped: list[Job] = []  # cancelled while in the stream
        self.batch_tokens = batch_tokens
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: deque[Job] = deque()
        self._queued = 0  # subwords waiting
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = thread or ModelThread("rosetta-worker")
        self._running: Future | None = None
        self._in_flight = 0  # jobs queued or being decoded
        self._peak = 0  # the most in flight at once since the last group was formed
        self._free_since = 0.0  # when the worker finished its last group

    # ---- the event loop's side ----------------------------------------------------
    def start(self) -> None:
        """Starts the worker (again, after ``stop``: an app may be started more than
        once, as test clients do); a no-op while it runs."""
        with self._changed:
            if self._running is not None and not self._running.done():
                return
            self._stopping = False
            self._running = self._thread.submit(self._work)

    @property
    def alive(self) -> bool:
        return self._running is not None and not self._running.done() and not self._stopping

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
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._changed.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Takes a job that has not started out of the queue (True); a job being
        decoded in a group finishes and its result is dropped, one in the stream
        leaves it at the next step (False)."""
        with self._changed:
            if not job.future.cancel():
                if self.stream is not None and not job.future.done():
                    self._dropped.append(job)
                    self._changed.notify()
                return False
            try:
                self._queue.remove(job)
                self._queued -= job.size
                self._in_flight -= 1
            except ValueError:
                pass  # the worker took it and will skip it
            self._changed.notify()
            return True

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new jobs, lets the worker finish every queued one, and joins it."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._running is not None:
            self._running.result(timeout)

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
                same = [job for job in self._queue if job.key == first.key]
                start = max(first.arrived, self._free_since)
                left = start + self.max_wait - time.monotonic()
                # wait for as many requests as were in the server at once lately (all
                # of them, when the clients are waiting on each other's group)
                enough = (
                    len(same) >= self._peak or sum(job.size for job in same) >= self.batch_tokens
                )
                if self._stopping or enough or left <= 0:
                    break
                self._changed.wait(left)  # more jobs may come, or the first be cancelled
            return self._take_group(first)

    def _take(self, job: Job) -> bool:
        """Moves ``job`` out of the queue into work (under the lock); False if it was
        cancelled meanwhile."""
        self._queue.remove(job)
        self._queued -= job.size
        if job.future.set_running_or_notify_cancel():
            return True
        self._in_flight -= 1
        return False

    def _take_group(self, first: Job) -> list[Job]:
        """The queued jobs of ``first``'s key, oldest first, within ``batch_tokens``
        (with a stream, only jobs it does not accept)."""
        group, size = [], 0
        for job in list(self._queue):
            if job.key != first.key or (group and size + job.size > self.batch_tokens):
                continue
            if self.stream is not None and self.stream.accepts(job.payload):
                continue
            size += job.size
            if self._take(job):
                group.append(job)
        self._peak = self._in_flight  # counted again until the next group
        return group

    def _answer(self, job: Job, result: Any) -> None:
        """Sends a job's result (or exception) back to its request."""
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    def _decode_group(self, group: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.jobs += len(group)
        self.stats.largest = max(self.stats.largest, len(group))
        try:
            results = self.process([job.payload for job in group])
        except Exception as error:  # each request reports it; the worker goes on
            results = [error] * len(group)
        # out of flight before the answers go back: a client that answers at once
        # must not find its previous request still counted
        with self._changed:
            self._in_flight -= len(group)
            self._free_since = time.monotonic()
        for job, result in zip(group, results):
            self._answer(job, result)

    def _work(self) -> None:
        if self.stream is not None:
            return self._stream_work(self.stream)
        while (group := self._next_group()) is not None:
            if group:
                self._decode_group(group)

    def _stream_work(self, stream: Stream) -> None:
        """The worker with a stream: between two of its steps, queued jobs it accepts
        join it (while it is ``hungry``, up to ``batch_tokens`` subwords at a time,
        so the queue's bound still holds), cancelled ones leave it, and a group of
        jobs it does not accept is decoded on its own (``process``)."""
        while True:
            group: list[Job] = []
            joining: list[Job] = []
            with self._changed:
                while not (self._queue or self._dropped or stream.busy or self._stopping):
                    self._changed.wait()
                dropped, self._dropped = self._dropped, []
                if self._stopping and not (self._queue or stream.busy or dropped):
                    return
                if self._queue and not stream.accepts(self._queue[0].payload):
                    group = self._take_group(self._queue[0])
                elif self._queue and stream.hungry:
                    size = 0
                    for job in list(self._queue):
                        if size >= self.batch_tokens or not stream.accepts(job.payload):
                            break
                        size += job.size
                        if self._take(job):
                            joining.append(job)
            closed = [job for job in dropped if stream.close(job)]
            if closed:
                with self._changed:
                    self._in_flight -= len(closed)
            for job in closed:  # its request stopped waiting (cancel): done, with nothing
                job.future.set_result(None)
            for job in joining:
                stream.open(job)
            self.stats.streamed += len(joining)
            if group:
                self._decode_group(group)
            if not stream.busy:
                continue
            finished = stream.step()
            self.stats.steps += 1
            if finished:
                with self._changed:
                    self._in_flight -= len(finished)
            for job, result in finished:
                self._answer(job, result)
