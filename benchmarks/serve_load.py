"""Load on ``rosetta serve``: throughput, latency, errors and memory under concurrent
clients, beside offline translation with the same engine.

For each engine (rosetta's own ``torch`` search with continuous batching,
``--continuous true``; ``torch-groups``, the same search with requests grouped and
each group decoded until its longest sentence ends, the server's default; and
``ctranslate2`` on an export of the same model, which groups requests):

1. offline, in a process of its own: ``Translator.translate`` of the sentences
   in one call (length-sorted batches: the best an engine does), in consecutive
   groups of 32 (the most a server's group can hold under 32 clients, in arrival
   order: the ceiling of batching whole requests, before any HTTP) and one sentence
   at a time (the latency floor of a lone request; measured in rounds that
   alternate with the one-client rounds against the server);
2. the server, started as ``rosetta serve`` in its own process on 127.0.0.1 with
   the same thread count; N concurrent clients (1, 8, 32, 128, each a closed loop
   of single-sentence ``POST /v1/translate`` requests, ``"scores": false`` like
   the offline call) for a bounded number of requests per level: sentences/s,
   p50/p95/p99 latency, failed requests (an error, or an answer that is not the
   offline translation of its sentence: a lost or swapped answer);
3. the server's RSS (from /proc) before the load, every second during it, after
   the first 1,000 and after 10,000 requests of 32 clients.

The clients run in this process (asyncio + aiohttp), on the same 2 cores as the
server: the figures include their cost, as a real deployment's would not.

Head-of-line blocking at 32 clients: the p50 latency of the requests whose source
is among the shortest quarter of the test set (in words), over that of the longest
quarter (under request-level batching a short sentence waits for its group's
longest).

Bars (issue 34's, for the torch engine): at 32 clients, throughput >= 0.95x offline
batched with the same engine, and at 128 no lower than at 32; at 1 client, p50
latency <= offline single-sentence latency + 3 ms; at 32 clients, the shortest
quarter's p50 <= 0.6x the longest quarter's; no failed or lost request; RSS after
all ``--rss-requests`` (20,000) <= 1.10x RSS after 1,000.

    python benchmarks/serve_load.py --model experiments/multi30k/model   # ~25 min
    python benchmarks/serve_load.py --model MODEL --requests 200 --rss-requests 2000  # a look

Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import aiohttp
import httpx
import torch

from results_io import write_results
from rosetta.decode.translator import Translator

ROOT = Path(__file__).resolve().parents[1]
TEST_SOURCES = ROOT.parent / "shared" / "data" / "multi30k" / "test2016.en"
CLIENTS = (1, 8, 32, 128)
GROUP = 32  # the most a server's group can hold with 32 clients


# ---- offline ---------------------------------------------------------------------------
# In a process of its own (two engines' thread pools in one process slow each other
# down), kept alive so that its single-sentence latency can be measured in rounds
# that alternate with the server's: the machine's speed drifts within minutes.
_translator: Translator | None = None


def _load(model: Path, engine: str, threads: int) -> None:
    global _translator
    torch.set_num_threads(threads)
    _translator = Translator.load(model, engine=engine)


def offline_batched(sentences: list[str]) -> tuple[list[str], float]:
    """The translations, and sentences/s of one call (length-sorted batches: the best
    an engine does)."""
    assert _translator is not None
    _translator.translate(sentences[:16])  # warm-up
    start = time.perf_counter()
    texts = [t.text for t in _translator.translate(sentences)]
    return texts, len(sentences) / (time.perf_counter() - start)


def offline_groups(sentences: list[str], size: int) -> float:
    """Sentences/s translating consecutive groups of ``size`` (each length-sorted
    inside, none with the others): what a server whose groups hold ``size`` requests
    in arrival order can reach at best, with no HTTP and no waiting at all."""
    assert _translator is not None
    start = time.perf_counter()
    for i in range(0, len(sentences), size):
        _translator.translate(sentences[i : i + size])
    return len(sentences) / (time.perf_counter() - start)


def offline_single(sentences: list[str]) -> list[float]:
    """Seconds per sentence, translated one at a time."""
    assert _translator is not None
    latencies = []
    for sentence in sentences:
        start = time.perf_counter()
        _translator.translate([sentence])
        latencies.append(time.perf_counter() - start)
    return latencies


# ---- the server ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """``rosetta serve`` in a child process."""

    def __init__(self, model: Path, engine: str, threads: int, options: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "rosetta.cli", "serve", str(model), "--engine", engine]
        command += ["--port", str(self.port), "--threads", str(threads), "--log-level", "error"]
        command += options
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server failed: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def rss(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def load(
    url: str, sentences: list[str], expected: list[str] | None, clients: int, total: int
):
    """``clients`` closed loops sending ``total`` requests in all; returns (wall seconds,
    latencies in s, failures: [(index, what)]). aiohttp, not httpx: on this machine
    httpx's client spent 3-4 ms of CPU per request and capped the load near 250
    requests/s, where aiohttp sent 600-680 (requests that do no translation)."""
    latencies: list[tuple[int, float]] = []  # (sentence index, seconds)
    failures: list[tuple[int, str]] = []
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=clients)

    async def client(http: aiohttp.ClientSession) -> None:
        for number in counter:
            index = number % len(sentences)
            body = {"text": sentences[index], "scores": False}
            start = time.perf_counter()
            try:
                async with http.post(url + "/v1/translate", json=body) as response:
                    answer = await response.json() if response.status == 200 else None
                    status, text = response.status, (await response.text())[:100]
            except aiohttp.ClientError as error:
                failures.append((index, f"{type(error).__name__}"))
                continue
            latencies.append((index, time.perf_counter() - start))
            if answer is None:
                failures.append((index, f"HTTP {status}: {text}"))
            elif expected is not None and answer["translations"][0]["text"] != expected[index]:
                failures.append((index, "not the offline translation of its sentence"))

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return wall, latencies, failures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


ENGINES = {  # the name in results: (rosetta's engine, its server's options)
    "torch": ("torch", ["--continuous", "true"]),
    "torch-groups": ("torch", ["--continuous", "false"]),
    "ctranslate2": ("ctranslate2", []),
}


def measure_engine(args, name: str, model: Path, sentences: list[str]) -> dict:
    print(f"== {name}", flush=True)
    engine, options = ENGINES[name]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, spawn, _load, (model, engine, args.threads)) as child:
        expected, batched = child.submit(offline_batched, sentences).result()
        groups = child.submit(offline_groups, sentences, GROUP).result()
        print(f"offline: batched {batched:.1f} sent/s, groups of {GROUP} {groups:.1f}", flush=True)
        server = Server(model, engine, args.threads, [*options, *args.serve_options])
        try:
            asyncio.run(load(server.url, sentences, expected, 4, 32))  # warm-up
            levels: dict[int, dict] = {}
            single, levels[1] = lone_client(args, child, server, sentences, expected)
            for clients in [c for c in args.clients if c != 1]:
                levels[clients] = level(server, sentences, expected, clients, args.requests)
                if clients == 32:
                    levels[clients]["head_of_line"] = head_of_line(levels[clients], sentences)
            memory = rss_under_load(args, server, sentences, expected)
        finally:
            server.stop()
    base = {
        "batched_sentences_per_s": batched,
        f"groups_of_{GROUP}_sentences_per_s": groups,
        "single_p50_ms": 1000 * statistics.median(single),
        "single_sentences_per_s": len(single) / sum(single),
    }
    print(f"offline: single p50 {base['single_p50_ms']:.1f} ms", flush=True)
    return {"offline": base, "levels": dict(sorted(levels.items())), "memory": memory}


def level(server: Server, sentences, expected, clients: int, total: int, quiet=False) -> dict:
    """``total`` requests from ``clients`` closed loops."""
    total = max(total, 4 * clients)
    before = httpx.get(server.url + "/ready").json()
    wall, timed, failures = asyncio.run(load(server.url, sentences, expected, clients, total))
    after = httpx.get(server.url + "/ready").json()
    batches = after["batches"] - before["batches"]
    batched = after["requests_batched"] - before["requests_batched"]
    latencies = [seconds for _, seconds in timed]
    row = {
        "requests": total,
        "sentences_per_s": total / wall,
        "latencies": latencies,
        "timed": timed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "failed": len(failures),
        "failures": failures[:5],
        "requests_per_batch": batched / max(batches, 1),
        "decoding_steps": after["decoding_steps"] - before["decoding_steps"],
    }
    if not quiet:
        report(clients, row)
    return row


def head_of_line(row: dict, sentences: list[str]) -> dict:
    """p50 latency of the requests for the shortest quarter of the sentences (in
    words) and of the longest quarter, and their ratio."""
    words = sorted(len(sentence.split()) for sentence in sentences)
    short, long = words[len(words) // 4], words[3 * len(words) // 4]
    shortest = [t for i, t in row["timed"] if len(sentences[i].split()) <= short]
    longest = [t for i, t in row["timed"] if len(sentences[i].split()) >= long]
    short_p50, long_p50 = 1000 * percentile(shortest, 50), 1000 * percentile(longest, 50)
    print(f"  head of line: shortest quarter p50 {short_p50:.1f} ms, longest {long_p50:.1f} ms")
    return {
        "shortest_quarter_words": short,
        "longest_quarter_words": long,
        "shortest_p50_ms": short_p50,
        "longest_p50_ms": long_p50,
        "ratio": short_p50 / long_p50,
    }


def report(clients: int, row: dict) -> None:
    print(
        f"{clients:>4} clients: {row['sentences_per_s']:.1f} sent/s, p50 {row['p50_ms']:.1f} "
        f"ms, p99 {row['p99_ms']:.1f} ms, {row['failed']} failed, "
        f"{row['requests_per_batch']:.1f} requests per batch",
        flush=True,
    )


def lone_client(args, child, server: Server, sentences, expected) -> tuple[list[float], dict]:
    """One client against offline one-at-a-time, in alternating rounds of the same
    sentences: (offline seconds per sentence, the client's level)."""
    rounds = 5
    size = max(1, args.single // rounds)
    offline_times: list[float] = []
    rows = []
    for r in range(rounds):
        part, wanted = sentences[r * size : (r + 1) * size], expected[r * size : (r + 1) * size]
        offline_times += child.submit(offline_single, part).result()
        rows.append(level(server, part, wanted, 1, len(part), quiet=True))
    latencies = [t for row in rows for t in row["latencies"]]
    wall = sum(row["requests"] / row["sentences_per_s"] for row in rows)
    merged = {
        "requests": len(latencies),
        "sentences_per_s": len(latencies) / wall,
        "latencies": latencies,
        "timed": [],
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "failed": sum(row["failed"] for row in rows),
        "failures": [f for row in rows for f in row["failures"]][:5],
        "requests_per_batch": statistics.mean(row["requests_per_batch"] for row in rows),
        "decoding_steps": sum(row["decoding_steps"] for row in rows),
    }
    report(1, merged)
    return offline_times, merged


def rss_under_load(args, server: Server, sentences: list[str], expected: list[str]) -> dict:
    """RSS before, every second during, after the first 1,000 and after all
    ``--rss-requests`` requests of 32 clients."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(server.rss())

    before = server.rss()
    first = min(1000, args.rss_requests)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, _, failed_first = asyncio.run(load(server.url, sentences, expected, 32, first))
    after_first = server.rss()
    rest = args.rss_requests - first
    _, _, failed_rest = asyncio.run(load(server.url, sentences, expected, 32, rest))
    after_all = server.rss()
    done.set()
    sampler.join()
    memory = {
        "requests": args.rss_requests,
        "before_mib": before,
        "after_1000_mib": after_first,
        "after_all_mib": after_all,
        "peak_during_mib": max(samples, default=after_all),
        "growth": after_all / after_first - 1,
        "failed": len(failed_first) + len(failed_rest),
    }
    print(
        f"RSS: {before:.0f} MiB before, {after_first:.0f} after {first:,}, "
        f"{after_all:.0f} after {args.rss_requests:,} ({100 * memory['growth']:+.1f}%), "
        f"peak {memory['peak_during_mib']:.0f}; {memory['failed']} failed",
        flush=True,
    )
    return memory


# ---- report ----------------------------------------------------------------------------
def bars(result: dict) -> dict[str, bool]:
    base, levels, memory = result["offline"], result["levels"], result["memory"]
    checks = {}
    if 32 in levels:
        ratio = levels[32]["sentences_per_s"] / base["batched_sentences_per_s"]
        checks[f"32 clients >= 0.95x offline batched ({ratio:.2f}x)"] = ratio >= 0.95
        blocking = levels[32]["head_of_line"]["ratio"]
        checks[f"32 clients: shortest quarter p50 <= 0.6x longest ({blocking:.2f}x)"] = (
            blocking <= 0.6
        )
        if 128 in levels:
            more = levels[128]["sentences_per_s"] / levels[32]["sentences_per_s"]
            checks[f"128 clients >= 32 clients ({more:.2f}x)"] = more >= 1.0
    if 1 in levels:
        extra = levels[1]["p50_ms"] - base["single_p50_ms"]
        checks[f"1 client p50 <= offline single + 3 ms ({extra:+.1f} ms)"] = extra <= 3
    failed = sum(level["failed"] for level in levels.values()) + memory["failed"]
    checks[f"no failed or lost requests ({failed})"] = failed == 0
    growth = 100 * memory["growth"]
    checks[f"RSS growth after {memory['requests']:,} <= 10% ({growth:+.1f}%)"] = growth <= 10
    return checks


def table(results: dict) -> str:
    lines = [
        f"Serving under load ({results['date']}, {results['machine']}, {results['threads']} "
        f"threads, model {results['model']}, {results['sentences']} test2016 sentences, "
        f"search: the model's own, {results['search']})",
        "",
        "| engine | clients | sentences/s | vs offline batched | p50 ms | p95 ms | p99 ms "
        "| failed | shortest / longest quarter p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, result in results["engines"].items():
        base = result["offline"]
        batched = base["batched_sentences_per_s"]
        lines.append(f"| {engine} | offline, batched | {batched:.1f} | 1.00 | | | | | |")
        groups = base[f"groups_of_{GROUP}_sentences_per_s"]
        lines.append(
            f"| {engine} | offline, groups of {GROUP} in arrival order | {groups:.1f} | "
            f"{groups / batched:.2f} | | | | | |"
        )
        lines.append(
            f"| {engine} | offline, one at a time | {base['single_sentences_per_s']:.1f} | "
            f"{base['single_sentences_per_s'] / base['batched_sentences_per_s']:.2f} | "
            f"{base['single_p50_ms']:.1f} | | | | |"
        )
        for clients, row in result["levels"].items():
            ratio = row["sentences_per_s"] / base["batched_sentences_per_s"]
            hol = row.get("head_of_line")
            blocking = (
                f"{hol['shortest_p50_ms']:.0f} / {hol['longest_p50_ms']:.0f} ms = "
                f"{hol['ratio']:.2f}"
                if hol
                else ""
            )
            lines.append(
                f"| {engine} | {clients} | {row['sentences_per_s']:.1f} | {ratio:.2f} | "
                f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['failed']} | {blocking} |"
            )
    lines += ["", "| engine | RSS before | after 1,000 | after all | peak | growth | requests |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for engine, result in results["engines"].items():
        m = result["memory"]
        lines.append(
            f"| {engine} | {m['before_mib']:.0f} MiB | {m['after_1000_mib']:.0f} MiB | "
            f"{m['after_all_mib']:.0f} MiB | {m['peak_during_mib']:.0f} MiB | "
            f"{100 * m['growth']:+.1f}% | {m['requests']:,} |"
        )
    lines.append("")
    for engine, result in results["engines"].items():
        for name, passed in result["bars"].items():
            lines.append(f"- {engine}: {'PASS' if passed else 'FAIL'} {name}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory")
    parser.add_argument("--sources", type=Path, default=TEST_SOURCES, help="one sentence a line")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    parser.add_argument("--requests", type=int, default=1000, help="requests per level")
    parser.add_argument("--single", type=int, default=200, help="requests of 1 client")
    parser.add_argument("--rss-requests", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="serve_load")
    parser.add_argument(
        "--serve-options", nargs="*", default=[], help="for rosetta serve, e.g. --max-wait-ms=20"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sentences = args.sources.read_text(encoding="utf-8").splitlines()
    results = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "model": str(args.model),
        "sentences": len(sentences),
        "search": Translator.load(args.model).search.describe(),
        "engines": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for engine in args.engines:
            model = args.model
            if ENGINES[engine][0] == "ctranslate2":
                from rosetta.export.ctranslate2 import export_ctranslate2

                model = export_ctranslate2(args.model, Path(scratch) / "ct2")
            result = measure_engine(args, engine, model, sentences)
            result["bars"] = bars(result)
            results["engines"][engine] = result
    for result in results["engines"].values():
        for row in result["levels"].values():
            row.pop("latencies"), row.pop("timed")
    write_results(args.name, results, table(results))


if __name__ == "__main__":
    main()
