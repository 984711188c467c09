"""Starting the service: the listening socket, the memory settings, the model, uvicorn.

``run_server`` is what ``rosetta serve`` runs. The port is bound before the
model loads, so a port in use is a one-line error at once, and the address
printed is the one bound (``--port 0`` prints the port the system chose).
SIGTERM and Ctrl-C stop accepting, answer the queued requests, then exit.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import uvicorn

from rosetta.config import ServeConfig
from rosetta.serve.app import create_app
from rosetta.serve.service import TranslationService

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def steady_memory(primitive_cache: int = 64) -> None:
    """Keeps a long-running server's memory from creeping up as it meets new shapes
    (every group of a different size and length). Call it before the model runs.

    PyTorch's oneDNN paths keep what they build for each input shape: ideep's
    cache of computations (``LRU_CACHE_CAPACITY``, 1,024 by default) and oneDNN's
    primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, also 1,024). Decoding
    meets a new shape at almost every step, so both fill up over thousands of
    requests, each entry holding memory; fewer entries suffice. Measured on a
    Multi30k model decoding random groups of 8-32 sentences: RSS rose from 606 to
    736 MiB over 3,000 sentences with the defaults, and stayed at 532-566 MiB with
    64 entries, at the same speed. The worker also hands freed memory back to the
    system after each group (``rosetta.serve.service.release_memory``).
    """
    for variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(primitive_cache))


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port); an address that cannot
    be bound is a ``ValueError`` naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it every response waits for a delayed ACK (~40 ms)
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener


def url_of(listener: socket.socket) -> str:
    """``http://host:port/`` of a bound socket, with the port it actually holds."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_server(
    model_dir: str | Path,
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: str = "torch",
    device: str | None = None,
    threads: int | None = None,
    log_level: str = "info",
) -> None:
    """Serves ``model_dir`` with ``engine`` on ``host:port`` until SIGTERM or Ctrl-C.

    Binds first, then loads the model (on ``threads`` CPU threads, if given) and
    prints where it serves to stderr; uvicorn's graceful shutdown waits up to
    ``config.timeout_s`` + 5 s for the requests in flight."""
    listener = listen(host, port)
    if threads:
        torch.set_num_threads(threads)  # CTranslate2 takes the same count
    steady_memory()
    service = TranslationService.load(model_dir, engine, device, config)
    if host not in LOOPBACK:
        print(f"note: listening on {host}: anyone who can reach it may translate "
              "(there is no authentication)", file=sys.stderr)  # fmt: skip
    print(f"serving {model_dir} ({engine}) at {url_of(listener)}", file=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            log_level=log_level,
            timeout_graceful_shutdown=int(config.timeout_s) + 5,
        )
    )
    server.run(sockets=[listener])
