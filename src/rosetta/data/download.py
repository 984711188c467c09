"""Fetching Multi30k (task 1) from its public source, or from a local copy.

``download_multi30k(DEST, target="de")`` downloads the gzip'ed files of the
Multi30k repository for English and the target language (German, French or
Czech: the languages of the 2016 test set) and writes them decompressed as
``train.en``, ``train.de``, ``val.*`` and ``test2016.*``. Every file is written
to a temporary name and renamed when complete, so an interrupted download never
leaves a truncated file behind; files already present are kept. ``from_dir``
copies the same six files from a local folder instead (e.g.
``../shared/data/multi30k``).
"""

from __future__ import annotations

import gzip
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from rosetta.safeio import open_replacing

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
# rosetta's split name -> (local file prefix, remote file prefix)
MULTI30K_SPLITS = {
    "train": ("train", "train"),
    "val": ("val", "val"),
    "test2016": ("test2016", "test_2016_flickr"),
}
SOURCE = "en"
TARGETS = ("de", "fr", "cs")  # every Multi30k task-1 language with train, val and test2016


class DownloadError(RuntimeError):
    """A corpus file that could not be fetched or decompressed."""


def _fetch(url: str, dest: Path, progress: bool, timeout: float = 60.0) -> None:
    """Downloads ``url`` (gzip), decompresses it into ``dest`` atomically."""
    try:
        with (
            open_replacing(dest) as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                while chunk := response.read(1 << 16):
                    out.write(decompressor.decompress(chunk))
                    bar.update(len(chunk))
                out.write(decompressor.flush())
                if not decompressor.eof:
                    raise DownloadError(f"{url}: the gzip stream ended early (truncated download)")
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"{url}: {error.reason}") from None
    except (zlib.error, gzip.BadGzipFile, EOFError) as error:
        raise DownloadError(f"{url}: not a valid gzip file ({error})") from None
    except OSError as error:
        raise DownloadError(f"{url}: {error}") from None


def _copy(source: Path, dest: Path) -> None:
    """Copies ``source`` to ``dest`` through a temporary file, like ``_fetch``."""
    try:
        with open(source, "rb") as inp, open_replacing(dest) as out:
            shutil.copyfileobj(inp, out, 1 << 20)
    except OSError as error:
        raise DownloadError(f"cannot copy {source} to {dest}: {error}") from None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def download_multi30k(
    dest: str | Path,
    base_url: str = MULTI30K_URL,
    from_dir: str | Path | None = None,
    progress: bool = True,
    target: str = "de",
) -> dict[str, tuple[Path, Path]]:
    """Puts Multi30k English and ``target`` (de, fr or cs) into ``dest``; returns
    ``{split: (en_path, target_path)}``. Languages already there are kept, so one
    folder can hold En-De and En-Fr side by side.

    Raises ``DownloadError`` for a failed fetch or copy or a missing local file
    (files completed before it are kept, so a second call resumes), and
    ``ValueError`` when the two sides of a split differ in line count.
    """
    if target not in TARGETS:
        raise ValueError(f"Multi30k target {target!r}: expected one of {', '.join(TARGETS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, tuple[Path, Path]] = {}
    for split, (local, remote) in MULTI30K_SPLITS.items():
        for lang in (SOURCE, target):
            path = dest / f"{local}.{lang}"
            if path.exists():
                continue
            if from_dir is not None:
                source = Path(from_dir) / f"{local}.{lang}"
                if not source.exists():
                    raise DownloadError(f"{source} is missing: expected the file {local}.{lang}")
                _copy(source, path)
            else:
                _fetch(f"{base_url.rstrip('/')}/{remote}.{lang}.gz", path, progress)
        en, other = dest / f"{local}.{SOURCE}", dest / f"{local}.{target}"
        en_lines, other_lines = _count_lines(en), _count_lines(other)
        if en_lines != other_lines:
            raise ValueError(f"{en} has {en_lines:,} lines but {other} has {other_lines:,}")
        paths[split] = (en, other)
    return paths
