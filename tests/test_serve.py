"""The translation service: every endpoint, every limit, batching, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rosetta.config import ServeConfig
from rosetta.data.tokenizer import Tokenizer
from rosetta.decode.translator import Translator
from rosetta.serve.app import create_app
from rosetta.serve.batcher import Batcher, QueueFull
from rosetta.serve.service import TranslationService

SENTENCES = [
    "the dog sees a cat.",
    "the small cat found five farmers.",
    "two big teachers follow the girls in the tree.",
    "the happy cats help the teacher under the tree.",
]


def make_service(model_dir: Path, **limits) -> TranslationService:
    return TranslationService.load(model_dir, config=ServeConfig(**limits))


@pytest.fixture(scope="module", params=[False, True], ids=["groups", "continuous"])
def service(toy_model_dir, request) -> TranslationService:
    """The service in both batching modes: every API test holds for each."""
    return make_service(toy_model_dir, max_wait_ms=50, continuous=request.param)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as client:
        yield client


def offline(model_dir: Path, sentences: list[str], **search) -> list[str]:
    return [t.text for t in Translator.load(model_dir, **search).translate(sentences)]


# ---- the API ---------------------------------------------------------------------------
def test_health_ready_and_model(client, toy_model_dir):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/model").json()
    assert (info["source_language"], info["target_language"]) == ("en", "zeta")
    assert info["arch"] == "transformer" and info["engine"] == "torch"
    assert info["shape"] == {"encoder_layers": 2, "decoder_layers": 2, "heads": 4, "d_model": 64}
    assert info["validation"]["valid_bleu"] > 50  # what training recorded
    assert info["limits"]["max_texts"] == 64 and info["features"]["attention"] is True


def test_translate_equals_offline_translation(client, toy_model_dir):
    body = client.post("/v1/translate", json={"text": SENTENCES}).json()
    assert [t["text"] for t in body["translations"]] == offline(toy_model_dir, SENTENCES)
    assert body["search"]["beam"] == 2 and body["engine"] == "torch"  # the model's decode section
    single = client.post("/v1/translate", json={"text": SENTENCES[0], "beam": 1}).json()
    assert [t["text"] for t in single["translations"]] == offline(
        toy_model_dir, SENTENCES[:1], beam=1
    )


def test_nbest_scores_and_empty_text(client):
    body = client.post(
        "/v1/translate", json={"text": [SENTENCES[1], "", "  "], "beam": 3, "nbest": 3}
    )
    first, empty, blank = body.json()["translations"]
    assert len(first["hypotheses"]) == 3
    scores = [h["score"] for h in first["hypotheses"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["log_prob"] < 0 for h in first["hypotheses"])
    assert empty["text"] == blank["text"] == "" and empty["hypotheses"][0]["log_prob"] == 0


def test_sampling_is_seeded(client):
    request = {"text": SENTENCES[0], "nbest": 3, "sampling": {"seed": 7, "temperature": 1.5}}
    first = client.post("/v1/translate", json=request).json()
    again = client.post("/v1/translate", json=request).json()
    assert first == again and first["search"]["kind"] == "sampling"
    assert len(first["translations"][0]["hypotheses"]) == 3


def test_attention_shapes(client):
    request = {"text": SENTENCES[2], "return_attention": True}
    request["attention_kinds"] = ["cross", "encoder_self", "decoder_self"]
    result = client.post("/v1/translate", json=request).json()["translations"][0]
    attention = result["attention"]
    rows, cols = len(attention["target_pieces"]), len(attention["source_pieces"])
    assert attention["target_pieces"][-1] == "<eos>" and attention["decoder_inputs"][0] == "<bos>"
    cross = np.array(attention["cross"])
    assert cross.shape == (2, 4, rows, cols)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-3)
    assert np.array(attention["encoder_self"]).shape == (2, 4, cols, cols)
    decoder_self = np.array(attention["decoder_self"])
    assert decoder_self.shape == (2, 4, rows, rows)
    assert np.allclose(np.triu(decoder_self, k=1), 0)  # causal


def test_search_tree_leads_to_the_returned_hypotheses(client):
    request = {"text": SENTENCES[3], "beam": 4, "nbest": 2, "return_search": True}
    result = client.post("/v1/translate", json=request).json()["translations"][0]
    tree = result["search"]["beam"]
    nodes = {node["id"]: node for node in tree["nodes"]}
    assert tree["size"] == 4 and len(tree["chosen"]) == 2
    assert nodes[0]["status"] == "root"
    produced = []  # the pieces of each chosen hypothesis, <eos> included
    for chosen, hypothesis in zip(tree["chosen"], result["hypotheses"]):
        node, pieces = nodes[chosen], []
        assert node["status"] == "finished" and node["piece"] == "<eos>"
        assert node["score"] == pytest.approx(hypothesis["score"], abs=1e-4)
        assert node["log_prob"] == pytest.approx(hypothesis["log_prob"], abs=1e-4)
        while node["parent"] is not None:
            pieces.append(node["piece"])
            node = nodes[node["parent"]]
        produced.append(pieces[::-1])
        text = "".join(produced[-1][:-1]).replace("\u2581", " ").strip()
        assert text == hypothesis["text"]
    steps = {}
    for node in tree["nodes"][1:]:
        steps.setdefault(node["step"], []).append(node)
        assert nodes[node["parent"]]["step"] == node["step"] - 1
    # each step considers at most 2 * beam continuations and keeps at most beam alive
    assert all(len(group) <= 8 for group in steps.values())
    assert all(sum(n["status"] == "alive" for n in group) <= 4 for group in steps.values())
    candidates = result["search"]["candidates"]
    assert len(candidates) == len(produced[0])  # one row per produced piece of the best
    for row, piece in zip(candidates, produced[0]):
        probs = [c["prob"] for c in row]
        assert len(row) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert piece in [c["piece"] for c in row]  # beam search took a likely piece here


def test_greedy_search_view_has_candidates_but_no_tree(client):
    request = {"text": SENTENCES[0], "beam": 1, "return_search": True, "candidates": 2}
    search = client.post("/v1/translate", json=request).json()["translations"][0]["search"]
    assert search["beam"] is None and all(len(row) == 2 for row in search["candidates"])


# ---- limits and errors -------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_client(toy_model_dir):
    service = make_service(toy_model_dir, max_texts=3, max_chars=50, max_body_bytes=2048)
    service.config.max_beam = 4
    with TestClient(create_app(service)) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "status", "limit"),
    [
        ({"text": ["a"] * 4}, 413, "max_texts"),
        ({"text": "a" * 51}, 413, "max_chars"),
        ({"text": "a", "beam": 5}, 422, "max_beam"),
        ({"text": "a", "beam": 2, "nbest": 3}, 422, None),
        ({"text": "a", "bogus": True}, 422, None),
        ({"text": 3}, 422, None),
        ({"text": "a", "sampling": {"temperature": 0}}, 422, None),
        (b'{"text": "\\ud800"}', 422, None),
    ],
)
def test_limits_are_json_errors_that_name_them(strict_client, body, status, limit):
    if isinstance(body, bytes):  # JSON that Python cannot encode: a lone surrogate
        response = strict_client.post("/v1/translate", content=body)
    else:
        response = strict_client.post("/v1/translate", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["status"] == status and error["error"] and "\n" not in error["error"]
    assert error.get("limit") == limit


def test_body_limit_declared_or_streamed(strict_client):
    big = json.dumps({"text": "a" * 3000}).encode()
    declared = strict_client.post("/v1/translate", content=big)
    assert declared.status_code == 413 and declared.json()["limit"] == "max_body_bytes"
    streamed = strict_client.post(
        "/v1/translate", content=(big[i : i + 512] for i in range(0, len(big), 512))
    )
    assert streamed.status_code == 413 and streamed.json()["limit"] == "max_body_bytes"
    broken = strict_client.post("/v1/translate", content=b'{"text": ')
    assert broken.status_code == 422 and broken.json()["error"].startswith("invalid request")
    # and the server goes on serving
    assert strict_client.post("/v1/translate", json={"text": "a cat."}).status_code == 200


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(toy_model_dir):
    service = make_service(toy_model_dir, max_queue=20, timeout_s=0.3)
    client = TestClient(create_app(service))  # no lifespan: the worker never starts
    response = client.post("/v1/translate", json={"text": SENTENCES[0]})
    assert response.status_code == 504 and response.json()["limit"] == "timeout_s"
    assert service.batcher.queued == 0  # the timed-out request left the queue
    from rosetta.serve.schemas import TranslateRequest

    service.submit(TranslateRequest(text="the dog sees a cat and the dog sees a cat ."))
    full = client.post("/v1/translate", json={"text": SENTENCES[2]})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["limit"] == "max_queue"
    assert client.get("/ready").status_code == 503  # the worker does not run


def test_a_client_that_disconnects_leaves_the_queue(toy_model_dir):
    service = make_service(toy_model_dir)  # worker not started: the job would wait
    app = create_app(service)
    body = json.dumps({"text": SENTENCES[0]}).encode()
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    sent = []

    async def receive():
        message = next(messages, None)
        if message is None:
            await asyncio.sleep(0.2)  # the client waits a while, then hangs up
            assert service.batcher.queued > 0
            return {"type": "http.disconnect"}
        return message

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/translate", "raw_path": b"/v1/translate",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "headers": [(b"content-type", b"application/json")],
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert service.batcher.queued == 0 and not service.batcher._queue


# ---- batching ----------------------------------------------------------------------------
def served(service: TranslationService, requests: list[dict], clients: int) -> list[dict]:
    with TestClient(create_app(service)) as client, ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda r: client.post("/v1/translate", json=r).json(), requests))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(toy_model_dir):
    service = make_service(toy_model_dir, max_wait_ms=300)
    requests = [{"text": s} for s in SENTENCES] + [{"text": s, "beam": 1} for s in SENTENCES]
    answers = served(service, requests, 8)
    got = [a["translations"][0]["text"] for a in answers]
    assert got == offline(toy_model_dir, SENTENCES) + offline(toy_model_dir, SENTENCES, beam=1)
    stats = service.batcher.stats
    assert stats.jobs == 8 and stats.largest > 1  # batched across requests
    assert stats.batches >= 2  # beam 5 and greedy never share a batch


def test_streamed_requests_share_decoding_steps_and_each_gets_its_own_answer(toy_model_dir):
    """Continuous batching: requests join the running search; each answer is the
    offline one, and concurrent requests take fewer steps than one after another."""
    requests = [{"text": s} for s in SENTENCES] + [{"text": s, "beam": 1} for s in SENTENCES]
    alone = make_service(toy_model_dir, continuous=True)
    served(alone, requests, 1)
    together = make_service(toy_model_dir, continuous=True)
    answers = served(together, requests, 8)
    got = [a["translations"][0]["text"] for a in answers]
    assert got == offline(toy_model_dir, SENTENCES) + offline(toy_model_dir, SENTENCES, beam=1)
    assert together.batcher.stats.streamed == alone.batcher.stats.streamed == 8
    assert together.batcher.stats.batches == 0  # nothing went through groups
    assert together.batcher.stats.steps < alone.batcher.stats.steps


def test_batcher_groups_by_key_and_budget_and_drains_on_stop():
    seen = []
    batcher = Batcher(lambda payloads: seen.append(payloads) or payloads, 10, 0.2, 25)
    jobs = [batcher.submit(key, size, (key, i)) for i, (key, size) in
            enumerate([("a", 4), ("b", 4), ("a", 4), ("a", 4), ("b", 4)])]  # fmt: skip
    with pytest.raises(QueueFull):
        batcher.submit("a", 6, "too much")
    batcher.cancel(jobs[3])
    batcher.start()
    batcher.stop(timeout=5)
    assert [job.future.result() for job in jobs if not job.future.cancelled()] == [
        ("a", 0), ("b", 1), ("a", 2), ("b", 4)
    ]  # fmt: skip
    assert seen == [[("a", 0), ("a", 2)], [("b", 1), ("b", 4)]]
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit("a", 1, "late")


def test_a_failing_group_fails_its_jobs_and_the_worker_goes_on():
    def process(payloads):
        if "bad" in payloads:
            raise RuntimeError("boom")
        return payloads

    batcher = Batcher(process, 100, 0.0, 100)
    batcher.start()
    bad = batcher.submit("x", 1, "bad")
    with pytest.raises(RuntimeError, match="boom"):
        bad.future.result(timeout=5)
    assert batcher.submit("x", 1, "good").future.result(timeout=5) == "good"
    batcher.stop(timeout=5)


class FakeStream:
    """A stream whose jobs end after ``payload`` steps ("group": not streamed; a
    negative count: never; "fail": its step raises for it)."""

    def __init__(self) -> None:
        self.jobs: dict[int, list] = {}
        self.closed: list = []

    def accepts(self, payload) -> bool:
        return payload != "group"

    def open(self, job) -> None:
        self.jobs[id(job)] = [job, job.payload]

    def close(self, job) -> bool:
        self.closed.append(job.payload)
        return self.jobs.pop(id(job), None) is not None

    def step(self) -> list:
        finished = []
        for key, entry in list(self.jobs.items()):
            job, left = entry
            if left == "fail":
                finished.append((job, RuntimeError("boom")))
                del self.jobs[key]
                continue
            entry[1] = left - 1
            if entry[1] == 0:
                finished.append((job, f"done {job.payload}"))
                del self.jobs[key]
        return finished

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def hungry(self) -> bool:
        return True


def test_a_streamed_job_leaves_when_cancelled_and_others_go_on():
    stream = FakeStream()
    batcher = Batcher(lambda payloads: [f"grouped {p}" for p in payloads], 100, 0.0, 100,
                      stream=stream)  # fmt: skip
    batcher.start()
    forever = batcher.submit("k", 1, -1)  # never ends by itself
    short, grouped = batcher.submit("k", 1, 3), batcher.submit("k", 1, "group")
    failing = batcher.submit("k", 1, "fail")
    assert short.future.result(timeout=5) == "done 3"
    assert grouped.future.result(timeout=5) == "grouped group"  # between two steps
    with pytest.raises(RuntimeError, match="boom"):
        failing.future.result(timeout=5)
    assert not batcher.cancel(forever)  # running: it leaves the stream at the next step
    assert forever.future.result(timeout=5) is None and stream.closed == [-1]
    assert not stream.busy and batcher._in_flight == 0
    later = batcher.submit("k", 1, 2)
    batcher.stop(timeout=5)  # drains what is streamed
    assert later.future.result(timeout=0) == "done 2"
    assert batcher.stats.streamed == 4 and batcher.stats.batches == 1


# ---- LibreTranslate ------------------------------------------------------------------------
def test_libretranslate_json_and_form(client, toy_model_dir):
    expected = offline(toy_model_dir, SENTENCES[:2])
    one = client.post("/translate", json={"q": SENTENCES[0], "source": "en", "target": "zeta"})
    assert one.json() == {"translatedText": expected[0]}
    many = client.post(
        "/translate",
        json={"q": SENTENCES[:2], "source": "auto", "target": "zeta", "format": "text"},
    )
    assert many.json() == {"translatedText": expected}
    form = client.post("/translate", data={"q": SENTENCES[1], "source": "en", "target": "zeta"})
    assert form.json() == {"translatedText": expected[1]}
    alternatives = client.post(
        "/translate", json={"q": SENTENCES[0], "source": "en", "target": "zeta", "alternatives": 2}
    ).json()
    assert alternatives["translatedText"] == expected[0] and len(alternatives["alternatives"]) == 2
    assert client.get("/languages").json() == [
        {"code": "en", "name": "English", "targets": ["zeta"]},
        {"code": "zeta", "name": "zeta", "targets": []},
    ]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"q": "a", "source": "en", "target": "de"}, "en->zeta"),
        ({"q": "a", "source": "fr", "target": "zeta"}, "en->zeta"),
        ({"q": "a", "source": "en", "target": "zeta", "format": "html"}, "format text"),
        ({"source": "en", "target": "zeta"}, "q"),
        ({"q": "a", "source": "en", "target": "zeta", "alternatives": 40}, "max_beam"),
    ],
)
def test_libretranslate_errors_are_400(client, body, words):
    response = client.post("/translate", json=body)
    assert response.status_code == 400 and words in response.json()["error"]


# ---- engines and the page's files ------------------------------------------------------------
def test_ctranslate2_engine_serves_translations_but_not_attention(toy_model_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    from rosetta.export.ctranslate2 import export_ctranslate2

    export = export_ctranslate2(toy_model_dir, tmp_path / "ct2")
    service = TranslationService.load(export, engine="ctranslate2")
    with TestClient(create_app(service)) as client:
        body = client.post("/v1/translate", json={"text": SENTENCES, "beam": 1}).json()
        assert [t["text"] for t in body["translations"]] == offline(
            toy_model_dir, SENTENCES, beam=1
        )
        refused = client.post("/v1/translate", json={"text": "a", "return_attention": True})
        assert refused.status_code == 422 and "--engine torch" in refused.json()["error"]
        assert client.get("/v1/model").json()["features"]["attention"] is False


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http" not in page.text.split("<body")[1].lower()
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/v1/translate" in client.get("/openapi.json").json()["paths"]


# ---- the command -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def serve(model_dir: Path, port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "rosetta.cli", "serve", str(model_dir), "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*command, "--log-level", "warning", *options],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_sigterm_finishes_queued_requests_then_exits(toy_model_dir):
    import httpx

    port = free_port()
    process = serve(toy_model_dir, port, "--threads", "2")
    try:
        wait_until_up(port, process)
        url = f"http://127.0.0.1:{port}/v1/translate"
        results: dict[int, httpx.Response] = {}
        busy = {"text": [" ".join(SENTENCES * 10)] * 64, "beam": 16}  # keeps the worker busy

        def ask(i: int) -> None:
            body = busy if i < 0 else {"text": SENTENCES[i]}
            try:
                results[i] = httpx.post(url, json=body, timeout=120)
            except httpx.HTTPError as error:  # reported by the assertions below
                results[i] = error

        def status() -> dict:
            return httpx.get(f"http://127.0.0.1:{port}/ready").json()

        def until(condition: Callable[[dict], bool], what: str) -> None:
            deadline = time.monotonic() + 60
            while not condition(status()):
                assert time.monotonic() < deadline, f"timed out waiting until {what}"
                assert -1 not in results, f"the big request ended before {what}: grow it"
                time.sleep(0.005)

        # no fixed sleeps: SIGTERM goes when the test has seen small requests waiting
        # behind the big one, whatever this machine's speed
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(-1, len(SENTENCES))]
        threads[0].start()
        took = lambda s: s["batches"] + s["requests_streamed"] >= 1  # noqa: E731
        until(took, "the worker took the big request")
        for thread in threads[1:]:
            thread.start()
        # every small request queued (subwords, as the batcher counts them) before the
        # signal: one still connecting when it comes is refused, rightly
        tokenizer = Tokenizer.load(toy_model_dir)
        small = sum(max(1, len(ids)) for ids in tokenizer.encode_source(list(SENTENCES)))
        until(lambda s: s["queued"] >= small, "every small request was queued")
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        # uvicorn ends by re-raising the signal once the requests are answered
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        process.kill()
    assert all(isinstance(r, httpx.Response) for r in results.values()), results
    assert len(results[-1].json()["translations"]) == 64
    got = [results[i].json()["translations"][0]["text"] for i in range(len(SENTENCES))]
    assert got == offline(toy_model_dir, SENTENCES)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_a_port_in_use_is_a_one_line_error(untrained_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = serve(untrained_model_dir, port)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        f"rosetta serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_bad_serve_settings_are_a_one_line_error(untrained_model_dir, capsys):
    from rosetta.cli import main

    assert main(["serve", str(untrained_model_dir), "--max-texts", "0", "--max-wait-ms", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "rosetta serve: error: --max-texts: Input should be greater than or equal to 1; "
        "--max-wait-ms: Input should be greater than or equal to 0"
    ]


# ---- lexical constraints and glossaries -----------------------------------------------------
def test_translate_with_constraints_and_glossary(client, toy_model_dir):
    sentences = (toy_model_dir.parent / "corpus" / "test.en").read_text().splitlines()[:3]
    free = offline(toy_model_dir, sentences, beam=4)
    wanted = free[1].split()[-1]
    body = {"text": sentences, "beam": 4, "constraints": [[wanted], [], []]}
    answer = client.post("/v1/translate", json=body)
    assert answer.status_code == 200, answer.text
    got = answer.json()["translations"]
    expected = Translator.load(toy_model_dir, beam=4).translate(sentences, [[wanted], [], []])
    assert [t["text"] for t in got] == [t.text for t in expected]
    assert got[0]["constraints"] == [{"text": wanted, "met": True}] and got[1]["constraints"] == []
    term = {"source": sentences[2].split()[0], "targets": [wanted]}
    answer = client.post("/v1/translate", json={"text": sentences[2], "glossary": [term]})
    assert answer.json()["translations"][0]["constraints"] == [{"text": wanted, "met": True}]
    for bad, message in [
        ({"constraints": [["x"], []]}, "2 constraint lists for 3 texts"),
        ({"constraints": [["x " * 300], [], []]}, "longer than the output limit"),
        ({"constraints": [["x"], [], []], "search": "sampling"}, "need beam search"),
        ({"glossary": "legal"}, "no glossary named 'legal'"),
        ({"constraints": [["x"], [], []], "return_search": True}, "search view is not shown"),
    ]:
        answer = client.post("/v1/translate", json={"text": sentences, **bad})
        assert answer.status_code == 422 and message in answer.json()["error"], answer.text


def test_named_glossary_loaded_at_start(toy_model_dir, tmp_path):
    sentences = (toy_model_dir.parent / "corpus" / "test.en").read_text().splitlines()[:2]
    target = offline(toy_model_dir, sentences[1:], beam=4)[0].split()[0]
    (tmp_path / "g.tsv").write_text(f"{sentences[0].split()[0]}\t{target}\n", encoding="utf-8")
    service = make_service(toy_model_dir, glossaries=f"terms={tmp_path / 'g.tsv'}")
    with TestClient(create_app(service)) as client:
        assert client.get("/v1/model").json()["glossaries"] == ["terms"]
        answer = client.post("/v1/translate", json={"text": sentences[0], "glossary": "terms"})
        assert answer.json()["translations"][0]["constraints"] == [{"text": target, "met": True}]
