"""The service's continuous batching: every request's sentences join one running
search as soon as there is room, and each request is answered when its last
sentence ends.

``EngineStream`` is the ``rosetta.serve.batcher.Stream`` of rosetta's own engine:
one ``rosetta.decode.engine.Engine`` per search setting (requests asking for
different settings never share a search), each within ``serve.max_sentences``
sentences and ``serve.batch_tokens`` padded source tokens. A request is
cut into the same segments as offline translation (``Translator.segment``) and
put together the same way (``Segmented.assemble``), so its answer is the one
``Translator.translate`` gives.

Requests that want to see inside the model (attention, the search view) and
CTranslate2, which cannot admit a sentence into a running search, are not
streamed: they are decoded as groups (``TranslationService._process``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rosetta.decode.common import Found, Lengths
from rosetta.decode.engine import Engine, LeftToRightSearch
from rosetta.decode.translator import Segmented, TorchTranslator, Translation
from rosetta.memory import release_memory
from rosetta.serve.batcher import Job

# a request waits at most this many steps to join a running search, unless an eighth of
# max_sentences is waiting: each admission copies the caches once (README, Serving)
PATIENCE = 2
TRIM_EVERY = 1000  # steps between heap trims while the stream never runs dry


@dataclass(eq=False)
class _Open:
    job: Job
    serial: int  # its number in the engines' keys (never reused)
    engine: str  # the key of its engine
    segmented: Segmented
    found: list[Found | None] = field(default_factory=list)
    left: int = 0  # segments not finished


class EngineStream:
    """Streams the jobs of a ``TorchTranslator`` whose search writes left to right
    and that ask for no view inside the model; ``answer(work, translations)`` makes
    a finished job's result."""

    def __init__(
        self, answer: Callable[[Any, list[Translation]], Any], max_sentences: int, max_tokens: int
    ) -> None:
        """Engines of at most ``max_sentences`` sentences and ``max_tokens`` padded
        source tokens."""
        self.answer = answer
        self.max_sentences, self.max_tokens = max_sentences, max_tokens
        self.engines: dict[str, Engine] = {}
        self.open_jobs: dict[int, _Open] = {}
        self._ready: list[tuple[Job, Any]] = []  # finished without a step (no segment)
        self._serials = itertools.count()
        self._steps = 0
        self._by_serial: dict[int, _Open] = {}

    def accepts(self, work: Any) -> bool:
        translator = work.translator
        return (
            isinstance(translator, TorchTranslator)
            and isinstance(translator.search, LeftToRightSearch)
            and not (work.attention or work.candidates)
        )

    def _engine(self, translator: TorchTranslator, constrained: bool) -> tuple[str, Engine]:
        key = translator.options.model_dump_json() + (" constrained" if constrained else "")
        if key not in self.engines:
            opts = translator.options
            self.engines[key] = translator.search.engine(
                translator.model, Lengths.of(opts, translator.max_source_len),
                scores=opts.scores, max_sentences=self.max_sentences, max_tokens=self.max_tokens,
                patience=PATIENCE, constrained=constrained,
            )  # fmt: skip
        return key, self.engines[key]

    def open(self, job: Job) -> None:
        work = job.payload
        segmented = work.translator.segment([source.ids for source in work.sources])
        constrained = any(source.constraints for source in work.sources)
        key, engine = self._engine(work.translator, constrained)
        # a constrained source is never split (checked at submission): its one segment
        wanted = {span.start: work.sources[i].constraints for i, span in segmented.spans.items()}
        count = len(segmented.segments)
        entry = _Open(job, next(self._serials), key, segmented, [None] * count, count)
        if not count:
            self._ready.append((job, self._finish(entry)))
            return
        self.open_jobs[id(job)] = self._by_serial[entry.serial] = entry
        for index, ids in enumerate(segmented.segments):
            engine.add(ids, (entry.serial, index), wanted.get(index, ()))

    def close(self, job: Job) -> bool:
        entry = self.open_jobs.pop(id(job), None)
        if entry is None or entry.job is not job:
            return False
        del self._by_serial[entry.serial]
        engine = self.engines.get(entry.engine)
        if engine is not None:
            for index in range(len(entry.found)):
                engine.discard((entry.serial, index))
        return True

    def _forget(self, entry: _Open) -> None:
        del self.open_jobs[id(entry.job)], self._by_serial[entry.serial]

    @property
    def busy(self) -> bool:
        return bool(self.open_jobs or self._ready)

    @property
    def hungry(self) -> bool:
        return not any(engine.queue for engine in self.engines.values())

    def _finish(self, entry: _Open) -> Any:
        """A job's result from its segments' (an exception fails the job only)."""
        work = entry.job.payload
        try:
            found = entry.segmented.assemble(entry.found)
            translations = [
                work.translator.translation(source, result)
                for source, result in zip(work.sources, found)
            ]
            return self.answer(work, translations)
        except Exception as error:
            return error

    def step(self) -> list[tuple[Job, Any]]:
        finished, self._ready = self._ready, []
        for key, engine in list(self.engines.items()):
            if not engine.busy:
                del self.engines[key]
                continue
            try:
                with torch.inference_mode():
                    done = engine.step()
            except Exception as error:  # every job on this engine fails; the rest go on
                del self.engines[key]
                for entry in [e for e in self._by_serial.values() if e.engine == key]:
                    self._forget(entry)
                    finished.append((entry.job, error))
                continue
            for (serial, index), found in done:
                entry = self._by_serial.get(serial)
                if entry is None:
                    continue
                entry.found[index] = found
                entry.left -= 1
                if not entry.left:
                    self._forget(entry)
                    finished.append((entry.job, self._finish(entry)))
        self._steps += 1
        if not self.open_jobs or self._steps % TRIM_EVERY == 0:
            release_memory()  # a step's temporaries do not stay resident
        return finished
