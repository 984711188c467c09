"""The web page in a real browser: Debian's headless Chromium, driven by Playwright,
against ``rosetta serve``'s app on 127.0.0.1.

``make test`` installs Chromium first (``make chromium``); without it these tests
fail with the command that installs it.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from rosetta.config import ServeConfig
from rosetta.decode.glossary import Glossary
from rosetta.decode.translator import Translator
from rosetta.serve.app import create_app
from rosetta.serve.service import TranslationService

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SENTENCE = "the small cat found five farmers."
BEAM = 4  # the beam the glossary test sets on the page and decodes with here


@pytest.fixture(scope="module")
def term(toy_model_dir) -> tuple[str, str, str]:
    """A test sentence, one of its words and a target word the model produces for
    another sentence but not for this one: a glossary term that changes its output."""
    sentences = (toy_model_dir.parent / "corpus" / "test.en").read_text().splitlines()[:6]
    free = Translator.load(toy_model_dir, beam=BEAM).translate(sentences)
    own = free[0].text.split()
    target = next(w for t in free[1:] for w in t.text.split() if w.isalpha() and w not in own)
    source = next(w for w in sentences[0].split() if w.isalpha())
    return sentences[0], source, target


@pytest.fixture(scope="module")
def server(toy_model_dir, term, tmp_path_factory):
    """uvicorn serving the toy model on a free loopback port, in a thread, with the
    glossary "demo" (the term) loaded."""
    import uvicorn

    _, source, target = term
    glossary = tmp_path_factory.mktemp("glossary") / "demo.tsv"
    glossary.write_text(f"{source}\t{target}\n", encoding="utf-8")
    config = ServeConfig(max_wait_ms=1, glossaries=f"demo={glossary}")
    service = TranslationService.load(toy_model_dir, config=config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
        assert thread.is_alive(), "the server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed: make chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('zeta')")
    yield page
    page.close()
    # Chromium logs every 4xx answer; the one the test provokes is expected
    assert [e for e in errors if "status of 422" not in e] == []


def translate_on(page, text: str, press: str | None = None) -> None:
    page.fill("#source", text)
    before = page.text_content("#translation")
    if press:
        page.press("#source", press)
    else:
        page.click("#translate")
    page.wait_for_function(
        "([before]) => { const t = document.querySelector('#translation').textContent;"
        " return t && t !== before && !document.querySelector('#translate').disabled; }",
        arg=[before],
    )


@pytest.mark.slow
def test_translate_see_the_heat_map_and_click_a_word(page, toy_model_dir, tmp_path):
    translate_on(page, SENTENCE)
    translator = Translator.load(toy_model_dir)
    expected = translator.translate([SENTENCE])[0]
    assert page.text_content("#translation").strip() == expected.text

    # one heat-map row per produced piece (the output's pieces and <eos>)
    produced = translator.tokenizer.target_pieces(expected.hypotheses[0][1].tokens)
    rows = page.locator("#heatmap th.target-piece")
    assert rows.count() == len(produced) + 1
    columns = page.locator("#heatmap th.source-piece")
    source_ids = translator.tokenizer.encode_source([SENTENCE])[0]
    assert columns.count() == len(source_ids)
    cells = page.locator("#heatmap td.cell")
    assert cells.count() == rows.count() * columns.count()

    # clicking a target word highlights the source words it attended to, the
    # most attended among them (its cells' weights are in their titles)
    row = 1
    rows.nth(row).click()
    highlighted = page.locator("#heatmap th.source-piece.highlighted")
    assert highlighted.count() >= 1
    weights = [
        float(page.locator(f'#heatmap td.cell[data-row="{row}"][data-col="{col}"]')
              .get_attribute("title").rsplit(" ", 1)[-1])
        for col in range(columns.count())
    ]  # fmt: skip
    top = int(np.argmax(weights))
    assert "highlighted" in columns.nth(top).get_attribute("class")
    assert "selected" in rows.nth(row).get_attribute("class")

    # and the reverse: a source word highlights the target words that attended to it
    columns.nth(top).click()
    assert page.locator("#heatmap th.target-piece.highlighted").count() >= 1

    # the search, made visible: candidates per position and the beam tree
    assert page.locator("#candidates li.candidate.chosen").count() >= 1
    assert page.locator("#beam-tree svg g.node").count() > len(produced)
    assert page.locator("#beam-tree svg .best-path").count() >= 1

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.slow
def test_keyboard_layers_and_errors(page):
    translate_on(page, "the dog sees a cat.", press="Control+Enter")
    assert page.text_content("#translation").strip()
    # every layer and head of the cross attention can be chosen
    assert page.locator("#layer option").count() == 2
    assert page.locator("#head option").count() == 1 + 4  # the average and each head
    page.select_option("#head", "0")
    assert page.locator("#heatmap td.cell").count() > 0

    # an error from the API is shown as a message, not a blank (the page keeps the
    # beam within max_beam, so the request is changed on its way to the server)
    def over_the_limit(route) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "beam": 99}))

    page.route("**/v1/translate", over_the_limit)
    page.click("#translate")
    page.wait_for_selector("#error:not([hidden])")
    page.unroute("**/v1/translate")
    assert "max_beam" in page.text_content("#error")
    # German and other non-ASCII text is shown as typed
    translate_on(page, "Zwei Männer über der Brücke — «ça va?»")
    assert page.is_hidden("#error")
    sources = page.locator("#heatmap th.source-piece").all_text_contents()
    assert "ä" in "".join(sources) or "Männer" not in SENTENCE  # pieces keep umlauts


def translate_again(page) -> dict:
    """Clicks Translate and waits until the answer is shown; the request's body."""
    with page.expect_response("**/v1/translate") as answer:
        page.click("#translate")
    page.wait_for_function("!document.querySelector('#translate').disabled")
    return answer.value.request.post_data_json


def assert_marked_and_met(page, target: str) -> None:
    assert target in page.locator("#translation mark.term").all_text_contents()
    items = page.locator("#constraints li")
    assert items.count() == 1
    assert page.text_content("#constraints li .constraint-text") == target
    assert page.text_content("#constraints li .constraint-status") == "met"
    assert "1 of 1 required term met" in page.text_content("#constraints-summary")


@pytest.mark.slow
def test_glossary_required_phrases_and_a_malformed_line(page, toy_model_dir, term):
    sentence, source, target = term
    translator = Translator.load(toy_model_dir, beam=BEAM)
    expected = translator.translate([sentence], glossary=Glossary.from_pairs([(source, [target])]))
    assert expected[0].constraints == [{"text": target, "met": True}]

    # typed terms: the term found in the sentence makes its translation required
    page.fill("#beam", str(BEAM))
    page.fill("#glossary", f"{source} = {target}")
    page.fill("#source", sentence)
    translate_again(page)  # waits for the answer, not for a changed text
    assert page.text_content("#translation") == expected[0].text
    assert target not in translator.translate([sentence])[0].text.split()  # the glossary did it
    assert_marked_and_met(page, target)

    # the server's glossary instead: the typed terms are set aside, the name is sent
    assert page.is_visible("#glossary-name-field")
    page.select_option("#glossary-name", "demo")
    assert page.is_disabled("#glossary")
    body = translate_again(page)
    assert body["glossary"] == "demo" and "constraints" not in body
    assert_marked_and_met(page, target)

    # required phrases alone; nothing about glossaries is sent
    page.select_option("#glossary-name", "")
    page.fill("#glossary", "")
    page.fill("#required", f" {target} ,")
    body = translate_again(page)
    assert body["constraints"] == [[target]] and "glossary" not in body
    assert_marked_and_met(page, target)

    # a malformed line: an error beside the box that names it, and no request
    page.fill("#required", "")
    page.fill("#glossary", f"{source} = {target}\n\n{source} {target}")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/v1/translate" in r.url else None)
    page.click("#translate")
    page.wait_for_selector("#glossary-error:not([hidden])")
    assert "Glossary line 3" in page.text_content("#glossary-error")
    assert page.get_attribute("#glossary", "aria-invalid") == "true"
    assert sent == [] and page.is_hidden("#error")
    page.fill("#glossary", f"{source} = {target}")  # editing the box clears the error
    assert page.is_hidden("#glossary-error")
    assert page.get_attribute("#glossary", "aria-invalid") is None
