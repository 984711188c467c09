"""The service's bounds and strictness (issue 30): what a request may ask to see is
counted before decoding, bodies are built off the event loop with weights really
rounded, malformed bodies are 400s, types are strict, and ``rosetta serve`` binds
and prints a real port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from typing import Any, get_args

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rosetta.config import ServeConfig
from rosetta.serve.app import create_app
from rosetta.serve.budget import attention_size, search_size
from rosetta.serve.jsonbody import encode
from rosetta.serve.schemas import Sampling, TranslateRequest
from rosetta.serve.service import TranslationService, rounded

SENTENCES = ["the dog sees a cat.", "two big teachers follow the girls in the tree."]
KINDS = ["cross", "encoder_self", "decoder_self"]
EVERYTHING = {"return_attention": True, "attention_kinds": KINDS, "return_search": True}


def make_service(model_dir, **limits) -> TranslationService:
    return TranslationService.load(model_dir, config=ServeConfig(max_wait_ms=0, **limits))


@pytest.fixture(scope="module")
def service(untrained_model_dir) -> TranslationService:
    """An untrained model: its outputs run to the length budget, the worst case."""
    return make_service(untrained_model_dir)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as client:
        yield client


def estimates(service: TranslationService, body: dict[str, Any]) -> tuple[int, int]:
    """(attention weights, search items) the service counts for ``body`` before decoding."""
    translator = service.configured(TranslateRequest(**body))
    lengths = [len(source.ids) for source in translator.encode(body["text"])]
    bound = (translator.options, translator.max_source_len)
    kinds = body.get("attention_kinds", ["cross"]) if body.get("return_attention") else []
    weights = attention_size(lengths, kinds, service.attention_maps, *bound)
    k = body.get("candidates", 5) if body.get("return_search") else 0
    tree = translator.search.tree_width() if k else 0
    return weights, search_size(lengths, k, tree, *bound)


def returned(translations: list[dict[str, Any]]) -> tuple[int, int]:
    """(attention weights, search items) a response holds."""
    weights = items = 0
    for translation in translations:
        for kind in KINDS:
            if (translation["attention"] or {}).get(kind) is not None:
                weights += np.array(translation["attention"][kind]).size
        if translation["search"]:
            items += sum(len(row) for row in translation["search"]["candidates"])
            items += len((translation["search"]["beam"] or {"nodes": []})["nodes"])
    return weights, items


# ---- bounded response work ------------------------------------------------------------------
@pytest.mark.parametrize(
    "search", [{"beam": 4, "nbest": 2}, {"beam": 1}, {"sampling": {"seed": 3}}, {"beam": 16}]
)
def test_what_is_returned_never_exceeds_what_was_counted(client, service, search):
    body = {"text": [*SENTENCES, "", "a cat"], **EVERYTHING, **search}
    response = client.post("/v1/translate", json=body)
    assert response.status_code == 200, response.text
    weights, items = returned(response.json()["translations"])
    counted = estimates(service, body)
    assert 0 < weights <= counted[0] and 0 < items <= counted[1]


@pytest.mark.parametrize(
    ("limit", "body"),
    [
        ("max_attention_weights", {"return_attention": True, "attention_kinds": ["cross"]}),
        ("max_attention_weights", {"return_attention": True, "attention_kinds": KINDS}),
        ("max_search_items", {"return_search": True, "beam": 1, "candidates": 20}),
        ("max_search_items", {"return_search": True, "beam": 8}),
    ],
)
def test_a_request_over_a_response_limit_is_refused_before_decoding(
    untrained_model_dir, limit, body
):
    body = {"text": SENTENCES, **body}
    counted = dict(zip(("max_attention_weights", "max_search_items"), estimates(
        make_service(untrained_model_dir), body
    )))  # fmt: skip
    # no lifespan: the worker never runs, so an answer came before any decoding
    service = make_service(untrained_model_dir, timeout_s=0.5, **{limit: counted[limit] - 1})
    response = TestClient(create_app(service)).post("/v1/translate", json=body)
    assert response.status_code == 413, response.text
    error = response.json()
    assert error["limit"] == limit and error["value"] == counted[limit] - 1
    assert limit in error["error"] and f"{counted[limit]:,}" in error["error"]
    assert service.batcher.queued == 0
    # at the count itself the request is taken (and times out: nothing decodes)
    service = make_service(untrained_model_dir, timeout_s=0.2, **{limit: counted[limit]})
    assert TestClient(create_app(service)).post("/v1/translate", json=body).status_code == 504


@pytest.fixture(scope="module")
def long_model_dir(untrained_model_dir, tmp_path_factory):
    """The untrained model with 1,024 positions: texts of 2,000 characters fit."""
    import torch

    from rosetta.config import load_config
    from rosetta.data.tokenizer import Tokenizer
    from rosetta.model import build_model
    from rosetta.modeldir import CONFIG, save_model_dir

    config = load_config(untrained_model_dir / CONFIG)
    config.model.max_positions = 1024
    tokenizer_dir = untrained_model_dir.parent / "tokenizer"
    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    directory = tmp_path_factory.mktemp("long") / "model"
    return save_model_dir(directory, config, tokenizer_dir, model.eval(), {})


def test_the_largest_request_within_the_other_default_limits_is_refused(long_model_dir):
    """Issue 30's request: 64 texts of 2,000 characters, every attention kind and the
    search; 1.8 GB of JSON before there was a limit. Now a 413, before decoding (the
    worker does not run)."""
    service = TranslationService.load(long_model_dir)
    config = ServeConfig()
    text = ("the small cat found five farmers in the tree . " * 50)[: config.max_chars]
    body = {"text": [text] * config.max_texts, **EVERYTHING, "beam": config.max_beam}
    refused = TestClient(create_app(service)).post("/v1/translate", json=body)
    assert refused.status_code == 413 and refused.json()["limit"] == "max_attention_weights"


def test_default_limits_bound_a_body_well_under_100_mb():
    """The budget's worst case in bytes: a weight is at most 7 bytes of JSON
    (``0.1234,``), a search item at most ~160 (a tree node with every field)."""
    config = ServeConfig()
    worst = 7 * config.max_attention_weights + 160 * config.max_search_items
    assert worst < 40_000_000
    node = {"id": 99999, "parent": 99999, "step": 999, "piece": "\u2581" + "w" * 20,
            "log_prob": -123.4567, "status": "finished_dropped", "score": -12.3456}  # fmt: skip
    assert len(encode(node)) + 1 <= 160
    assert len(encode(rounded(np.full(1000, 0.123456, np.float32)))) == 7 * 1000 + 1


def test_weights_and_probabilities_are_rounded_for_real(client):
    body = {"text": SENTENCES, **EVERYTHING, "beam": 4}
    response = client.post("/v1/translate", json=body)
    shown: list[float] = []

    def collect(value: Any) -> None:
        if isinstance(value, float):
            shown.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for translation in response.json()["translations"]:
        collect(translation["attention"])
        collect(translation["search"])
    assert len(shown) > 1000
    # the number as the JSON holds it has at most 4 decimals (json reads the shortest repr)
    long = [x for x in shown if not re.fullmatch(r"-?\d+(\.\d{1,4})?", repr(x))]
    assert long == [], long[:5]
    # float32 values rounded and printed: the bug was 0.052400000393390656
    assert json.loads(encode(rounded(np.float32([0.0524, 1 / 3])))) == [0.0524, 0.3333]


def test_the_encoder_writes_what_json_response_writes():
    from starlette.responses import JSONResponse

    rng = np.random.default_rng(0)
    content = {
        "translations": [
            {"text": "é\u2028\"'\\", "attention": {"cross": rng.random((2, 3, 4, 5)).tolist()},
             "hypotheses": [{"score": None, "ok": True}], "empty": [], "nested": [[], [[]]]}
        ],
        "search": {"beam": 2, "pairs": [(1, 2.5e-7), (3, -0.0)]},
    }  # fmt: skip
    assert encode(content) == JSONResponse(content).body
    with pytest.raises(ValueError):
        encode({"a": [[float("nan")]]})


def test_health_answers_while_a_large_body_is_built(untrained_model_dir):
    """The body is built on a worker thread and part by part, so the event loop gets
    the interpreter between parts (json.dumps is one C call that holds the GIL)."""
    service = make_service(untrained_model_dir)  # groups (the default): `process` answers
    row = [0.1234] * 1000
    big = [{"text": "x", "attention": {"cross": [[row] * 500] * 4}}]  # 2 million weights
    started = time.perf_counter()
    json.dumps(big)
    alone = time.perf_counter() - started  # what the loop was blocked for before
    service.batcher.process = lambda group: [big for _ in group]
    latencies: list[float] = []
    with TestClient(create_app(service)) as client:
        answer: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: answer.update(r=client.post("/v1/translate", json={"text": "a"}))
        )
        thread.start()
        while thread.is_alive():
            sent = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - sent)
        thread.join()
    assert answer["r"].status_code == 200 and len(answer["r"].content) > 10_000_000
    assert len(latencies) >= 3, (latencies, alone)
    assert max(latencies) < alone / 3, (max(latencies), alone)


# ---- malformed bodies are 400s ----------------------------------------------------------------
DEEP = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"text": ' + b"[" * 100_000,
    b'{"q": ' + b'{"q":' * 50_000,
]


@pytest.mark.parametrize("body", DEEP, ids=["lists", "objects", "in-text", "in-q"])
def test_json_nested_too_deeply_is_a_400_on_every_route(client, body):
    app = client.app
    posts = [route.path for route in app.routes if "POST" in getattr(route, "methods", ())]
    assert set(posts) >= {"/v1/translate", "/translate"}
    for path in posts:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["status"] == 400 and "\n" not in response.json()["error"]
    assert client.get("/health").status_code == 200


FORMS = {
    "urlencoded raw": (b"q=caf\xe9&source=en&target=zeta", "application/x-www-form-urlencoded"),
    "urlencoded %": (b"q=caf%E9&source=en&target=zeta", "application/x-www-form-urlencoded"),
    "urlencoded % key": (b"q=a&source=en&target=zeta&%FF=1", "application/x-www-form-urlencoded"),
    "multipart": (
        b'--XX\r\nContent-Disposition: form-data; name="q"\r\n\r\ncaf\xe9\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="source"\r\n\r\nen\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="target"\r\n\r\nzeta\r\n--XX--\r\n',
        "multipart/form-data; boundary=XX",
    ),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_a_form_that_is_not_utf8_is_a_400(client, name):
    body, kind = FORMS[name]
    response = client.post("/translate", content=body, headers={"content-type": kind})
    assert response.status_code == 400, response.text
    assert "UTF-8" in response.json()["error"]
    fixed = body.replace(b"\xe9", "é".encode()).replace(b"%E9", b"%C3%A9")
    fixed = fixed.replace(b"%FF", b"x")
    assert (
        client.post("/translate", content=fixed, headers={"content-type": kind}).status_code == 200
    )


def test_libretranslate_refusals_are_400s(client):
    lone = b'{"q": "\\ud800", "source": "en", "target": "zeta"}'
    response = client.post("/translate", content=lone, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "Unicode" in response.json()["error"]


# ---- strict types ------------------------------------------------------------------------------
def wrong_values(model: type, field: str) -> list[Any]:
    """Values of the wrong type that a lax schema would have coerced."""
    kinds = set(get_args(model.model_fields[field].annotation)) or {
        model.model_fields[field].annotation
    }
    if bool in kinds:
        return ["1", "true", 1, 0]
    if int in kinds:
        return ["3", True, 3.0]
    if float in kinds:
        return ["1", True]
    return []


STRICT_CASES = [
    (field, value)
    for field in TranslateRequest.model_fields
    for value in wrong_values(TranslateRequest, field)
] + [
    (f"sampling.{field}", value)
    for field in Sampling.model_fields
    for value in wrong_values(Sampling, field)
]


def test_every_number_and_flag_of_the_schema_is_checked():
    fields = {field for field, _ in STRICT_CASES}
    assert {"beam", "nbest", "candidates", "scores", "return_attention"} <= fields
    assert {"sampling.seed", "sampling.top_k", "sampling.temperature", "length_penalty"} <= fields


@pytest.mark.parametrize(("field", "value"), STRICT_CASES)
def test_strict_types_mean_strict(client, field, value):
    body: dict[str, Any] = {"text": "a cat."}
    if field.startswith("sampling."):
        body["sampling"] = {field.split(".")[1]: value}
    else:
        body[field] = value
    response = client.post("/v1/translate", json=body)
    assert response.status_code == 422, (body, response.text)
    assert field.split(".")[-1] in response.json()["error"]


def test_numbers_still_take_integers(client):
    for body in ({"length_penalty": 1}, {"sampling": {"temperature": 2, "top_p": 1}}):
        response = client.post("/v1/translate", json={"text": "a cat.", **body})
        assert response.status_code == 200, response.text


# ---- rosetta serve ----------------------------------------------------------------------------
def test_serve_port_0_prints_the_port_it_bound(untrained_model_dir):
    import httpx

    command = [sys.executable, "-m", "rosetta.cli", "serve", str(untrained_model_dir)]
    process = subprocess.Popen(
        [*command, "--port", "0", "--log-level", "warning"], stderr=subprocess.PIPE, text=True
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "serving" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited"
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/$", line.strip())
        assert found, line
        port = int(found.group(1))
        assert port != 0
        for _ in range(100):
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"nothing answers on the port printed ({port})")
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "80.5"])
def test_a_port_out_of_range_is_a_usage_error(port, capsys):
    from rosetta.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "model", "--port", port])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("an integer in [0, 65535]")


def test_range_messages_say_which_ends_are_allowed():
    import argparse

    from rosetta.cli import PORT, PROBABILITY

    assert PORT("0") == 0 and PORT("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 65535\]"):
        PORT("65536")
    assert PROBABILITY("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0\.0, 1\.0\]"):
        PROBABILITY("0")


def test_the_printed_address_is_the_bound_one():
    from rosetta.serve.server import listen, url_of

    with listen("127.0.0.1", 0) as listener:
        assert url_of(listener) == f"http://127.0.0.1:{listener.getsockname()[1]}/"
        port = listener.getsockname()[1]
        listener.listen()
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: Address"):
            listen("127.0.0.1", port)
