"""Multi30k download against a local HTTP server (never the internet), and --from."""

from __future__ import annotations

import functools
import gzip
import http.server
import socket
import threading

import pytest

from rosetta.data.download import MULTI30K_SPLITS, DownloadError, download_multi30k


@pytest.fixture
def server(tmp_path):
    """Serves gzip'ed tiny Multi30k files from a folder on 127.0.0.1."""
    root = tmp_path / "remote"
    root.mkdir()
    for _, remote in MULTI30K_SPLITS.values():
        for lang, text in (
            ("en", "A dog runs.\nTwo men.\n"),
            ("de", "Ein Hund läuft.\nZwei Männer.\n"),
            ("fr", "Un chien court.\nDeux hommes.\n"),
            ("cs", "Pes běží.\nDva muži.\n"),
        ):
            (root / f"{remote}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_writes_decompressed_files(server, tmp_path):
    _, url = server
    paths = download_multi30k(tmp_path / "m30k", base_url=url, progress=False)
    assert set(paths) == {"train", "val", "test2016"}
    en, de = paths["test2016"]
    assert en.name == "test2016.en" and de.name == "test2016.de"
    assert de.read_text(encoding="utf-8") == "Ein Hund läuft.\nZwei Männer.\n"
    assert (de.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in (tmp_path / "m30k").iterdir()) == sorted(
        f"{name}.{lang}" for name, _ in MULTI30K_SPLITS.values() for lang in ("en", "de")
    )
    # a second call keeps the files and fetches nothing
    assert download_multi30k(tmp_path / "m30k", base_url="http://127.0.0.1:9/", progress=False)


def test_missing_file_is_an_error_and_leaves_no_partial_file(server, tmp_path):
    root, url = server
    (root / "val.de.gz").unlink()
    dest = tmp_path / "m30k"
    with pytest.raises(DownloadError, match=r"val\.de\.gz: HTTP 404"):
        download_multi30k(dest, base_url=url, progress=False)
    assert (dest / "val.en").exists()  # complete files are kept for the next try
    assert not (dest / "val.de").exists() and not list(dest.glob(".*"))


def test_corrupt_gzip_is_an_error(server, tmp_path):
    root, url = server
    (root / "train.en.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DownloadError, match="not a valid gzip"):
        download_multi30k(tmp_path / "m30k", base_url=url, progress=False)
    assert not (tmp_path / "m30k" / "train.en").exists()


def test_truncated_gzip_is_an_error(server, tmp_path):
    root, url = server
    data = (root / "test_2016_flickr.en.gz").read_bytes()
    (root / "test_2016_flickr.en.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match=r"test_2016_flickr\.en\.gz: .*truncated"):
        download_multi30k(tmp_path / "m30k", base_url=url, progress=False)
    assert not (tmp_path / "m30k" / "test2016.en").exists()


def test_unreachable_server_is_an_error(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(DownloadError, match=rf"127\.0\.0\.1:{port}/train\.en\.gz: "):
        download_multi30k(tmp_path / "m30k", base_url=url, progress=False)
    assert not list((tmp_path / "m30k").iterdir())


def test_copy_from_a_local_folder(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for name, _ in MULTI30K_SPLITS.values():
        (local / f"{name}.en").write_text("a\nb\n")
        (local / f"{name}.de").write_text("x\ny\n")
    paths = download_multi30k(tmp_path / "copy", from_dir=local)
    assert paths["train"][0].read_text() == "a\nb\n"
    (local / "val.de").unlink()
    with pytest.raises(DownloadError, match=r"val\.de is missing"):
        download_multi30k(tmp_path / "copy2", from_dir=local)


def test_mismatched_line_counts_are_an_error(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for name, _ in MULTI30K_SPLITS.values():
        (local / f"{name}.en").write_text("a\nb\n")
        (local / f"{name}.de").write_text("x\n")
    with pytest.raises(ValueError, match=r"train\.en has 2 lines but .*train\.de has 1"):
        download_multi30k(tmp_path / "copy", from_dir=local)


@pytest.mark.parametrize("target, line", [("fr", "Un chien court."), ("cs", "Pes běží.")])
def test_other_targets_download_beside_english(server, tmp_path, target, line):
    """The same download code fetches French or Czech; a folder can hold several."""
    _, url = server
    dest = tmp_path / "m30k"
    download_multi30k(dest, base_url=url, progress=False)  # En-De first
    paths = download_multi30k(dest, base_url=url, progress=False, target=target)
    en, other = paths["val"]
    assert en.name == "val.en" and other.name == f"val.{target}"
    assert other.read_text(encoding="utf-8").splitlines()[0] == line
    assert (dest / "val.de").exists()  # kept


def test_an_unknown_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected one of de, fr, cs"):
        download_multi30k(tmp_path / "m30k", target="es", progress=False)
    assert not (tmp_path / "m30k").exists()
