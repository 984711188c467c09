"""Prepared id arrays on disk: written as they are made, read memory-mapped.

A split is a folder of ``.npy`` files::

    src.npy          int32, every source id of the split, pair after pair
    src_offsets.npy  int64, pair i's source is src[src_offsets[i]:src_offsets[i+1]]
    tgt.npy          int32, likewise for the targets
    tgt_offsets.npy  int64
    src_lengths.npy  int32, each pair's source length (what batching reads)
    tgt_lengths.npy  int32

``SplitWriter`` appends to them chunk by chunk (a ``.npy`` header is written
first and rewritten with the final length at the end, in place: numpy reserves
room in the header for this), so preparation never holds a split in memory.
``TokenizedSplit.load`` maps them read-only (``np.load(mmap_mode="r")``): the
pages are the operating system's cache, not the process's memory, and opening
a split of millions of pairs costs milliseconds. Splits prepared before this
layout (one ``SPLIT.npz``) still load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARRAYS = ("src", "src_offsets", "tgt", "tgt_offsets")
# each pair's lengths too, so that batching reads 4 bytes a pair, not the offsets' 8 and
# a difference (splits written before them compute them from the offsets)
LENGTHS = ("src_lengths", "tgt_lengths")
_DTYPES = {"src": np.int32, "src_offsets": np.int64, "tgt": np.int32, "tgt_offsets": np.int64,
           "src_lengths": np.int32, "tgt_lengths": np.int32}  # fmt: skip


@dataclass
class TokenizedSplit:
    """Id sequences of one split, stored flat: pair ``i`` is ``src[src_off[i]:src_off[i+1]]``."""

    src: np.ndarray
    src_offsets: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray
    _lengths: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_lists(cls, src: list[list[int]], tgt: list[list[int]]) -> TokenizedSplit:
        def flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=offsets[-1])
            return flat, offsets

        return cls(*flatten(src), *flatten(tgt))

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    def _length(self, side: str) -> np.ndarray:
        if side not in self._lengths:  # computed once (without an int64 copy): the
            offsets = getattr(self, f"{side}_offsets")  # offsets may be millions long
            lengths = np.empty(len(offsets) - 1, dtype=np.int32)
            np.subtract(offsets[1:], offsets[:-1], out=lengths, casting="unsafe")
            self._lengths[side] = lengths
        return self._lengths[side]

    @property
    def src_lengths(self) -> np.ndarray:
        return self._length("src")

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self._length("tgt")

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i] : self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]

    def save(self, path: Path) -> None:
        """Writes the split as a folder of ``.npy`` files (what ``load`` maps)."""
        with SplitWriter(path) as writer:
            writer.add_flat(
                self.src, np.diff(self.src_offsets), self.tgt, np.diff(self.tgt_offsets)
            )

    @classmethod
    def load(cls, path: Path) -> TokenizedSplit:
        """Maps a split folder read-only; ``path.npz`` (an older layout) is read whole."""
        path = Path(path)
        if path.is_dir():
            split = cls(*(np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS))
            for name in LENGTHS:
                if (path / f"{name}.npy").exists():
                    side = name.removesuffix("_lengths")
                    split._lengths[side] = np.load(path / f"{name}.npy", mmap_mode="r")
            return split
        legacy = path.with_suffix(".npz")
        with np.load(legacy) as arrays:
            return cls(*(arrays[name] for name in ARRAYS))


class NpyAppender:
    """A one-dimensional ``.npy`` file written chunk by chunk.

    The header is written first with length 0 and rewritten with the real
    length by ``close``; numpy pads headers so that the length can grow in
    place (``GROWTH_AXIS_MAX_DIGITS``), which ``close`` checks. A file that was
    never closed has length 0 in its header: it is never read as data, and
    preparation writes into a staging folder anyway.
    """

    def __init__(self, path: Path, dtype: type) -> None:
        self.path, self.dtype, self.count = Path(path), np.dtype(dtype), 0
        self.handle = open(self.path, "wb")  # noqa: SIM115 -- closed by close/abandon
        self.header_size = self._write_header(0)

    def _write_header(self, length: int) -> int:
        self.handle.seek(0)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (length,),
        }
        np.lib.format.write_array_header_1_0(self.handle, header)
        return self.handle.tell()

    def append(self, values: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def close(self) -> None:
        """Writes the final length into the header, flushes and syncs the file."""
        self.handle.flush()
        end = self.handle.tell()
        if self._write_header(self.count) != self.header_size:
            raise RuntimeError(f"{self.path}: the .npy header cannot be rewritten in place")
        self.handle.seek(end)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def abandon(self) -> None:
        self.handle.close()


class SplitWriter:
    """Appends pairs to a split folder (see the module docstring); a context manager
    that closes the files on success and abandons them on an error."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files = {
            name: NpyAppender(self.path / f"{name}.npy", _DTYPES[name]) for name in ARRAYS + LENGTHS
        }
        self.ends = {"src": 0, "tgt": 0}
        for side in ("src", "tgt"):
            self.files[f"{side}_offsets"].append(np.zeros(1, dtype=np.int64))
        self.pairs = 0
        self.tokens = {"src": 0, "tgt": 0}

    def add_flat(
        self, src: np.ndarray, src_lengths: np.ndarray, tgt: np.ndarray, tgt_lengths: np.ndarray
    ) -> None:
        """Appends pairs given as flat id arrays and their per-pair lengths."""
        for side, flat, lengths in (("src", src, src_lengths), ("tgt", tgt, tgt_lengths)):
            lengths = np.asarray(lengths, dtype=np.int64)
            self.files[side].append(flat)
            self.files[f"{side}_offsets"].append(self.ends[side] + np.cumsum(lengths))
            self.files[f"{side}_lengths"].append(lengths)
            self.ends[side] += int(lengths.sum())
            self.tokens[side] += int(lengths.sum())
        self.pairs += len(src_lengths)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for appender in self.files.values():
            if kind is None:
                appender.close()
            else:
                appender.abandon()
