"""The web page in a real browser: Debian's headless Chromium, driven by Playwright,
against ``rosetta serve``'s app on 127.0.0.1.

``make test`` installs Chromium first (``make chromium``); without it these tests
fail with the command that installs it.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import HEAD_ROLES, heads_report
from rosetta.config import ServeConfig, load_config
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


@contextmanager
def serving(model_dir: Path, config: ServeConfig) -> Iterator[str]:
    """uvicorn serving ``model_dir`` on a free loopback port, in a thread: its URL."""
    import uvicorn

    service = TranslationService.load(model_dir, config=config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
        assert thread.is_alive(), "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(toy_model_dir, term, tmp_path_factory):
    """The toy model served, with the glossary "demo" (the term) loaded."""
    _, source, target = term
    glossary = tmp_path_factory.mktemp("glossary") / "demo.tsv"
    glossary.write_text(f"{source}\t{target}\n", encoding="utf-8")
    with serving(toy_model_dir, ServeConfig(max_wait_ms=1, glossaries=f"demo={glossary}")) as url:
        yield url


PRUNED = ("cross", 1, 0)  # marked pruned in the heads server's heads.json (see heads_report)


@pytest.fixture(scope="module")
def heads_model_dir(toy_model_dir, tmp_path_factory) -> Path:
    """A copy of the toy model with a heads.json for every head, one marked pruned."""
    model_dir = Path(shutil.copytree(toy_model_dir, tmp_path_factory.mktemp("heads") / "model"))
    report = heads_report(model_dir, pruned=(PRUNED,))
    (model_dir / "heads.json").write_text(json.dumps(report), encoding="utf-8")
    return model_dir


@pytest.fixture(scope="module")
def heads_server(heads_model_dir):
    with serving(heads_model_dir, ServeConfig(max_wait_ms=1)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed: make chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@contextmanager
def opened(browser, url: str):
    """The page at ``url``, loaded; no errors in its console but those expected."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []

    def logged(message) -> None:
        # GET /v1/heads answers 404 for a model without heads.json: the page shows it
        if message.type == "error" and not message.location.get("url", "").endswith("/v1/heads"):
            errors.append(message.text)

    page.on("console", logged)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('zeta')")
    try:
        yield page
    finally:
        page.close()
    # Chromium logs every 4xx answer; the one the test provokes is expected
    assert [e for e in errors if "status of 422" not in e] == []


@pytest.fixture
def page(browser, server):
    with opened(browser, server) as page:
        yield page


@pytest.fixture
def heads_page(browser, heads_server):
    with opened(browser, heads_server) as page:
        yield page


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


# ---- the heads view -----------------------------------------------------------------------
CELLS = """() => [...document.querySelectorAll('#heads-grids td.head-cell')].map((td) => ({
  kind: td.closest('table').dataset.kind, layer: Number(td.dataset.layer),
  head: Number(td.dataset.head), role: td.dataset.role, pruned: td.classList.contains('pruned'),
  disabled: td.querySelector('button').disabled,
  colour: getComputedStyle(td.querySelector('button')).backgroundColor,
  number: td.querySelector('.head-importance').textContent,
  label: td.querySelector('.head-role').textContent }))"""
WEIGHTS = """() => [...document.querySelectorAll('#heatmap td.cell')].map((td) =>
  [Number(td.dataset.row), Number(td.dataset.col), Number(td.title.split(' ').pop())])"""


def shown_weights(page) -> np.ndarray:
    """The heat map's weights, as its cells' titles give them (3 decimals)."""
    cells = page.evaluate(WEIGHTS)
    shown = np.zeros((max(r for r, _, _ in cells) + 1, max(c for _, c, _ in cells) + 1))
    for row, col, weight in cells:
        shown[row, col] = weight
    return shown


def click_head(page, kind: str, layer: int, head: int) -> dict:
    """Clicks a head in the grid, waits for the translation it asks for and its map;
    the request's body and the answer's attention."""
    with page.expect_response("**/v1/translate") as answer:
        page.click(f'#heads-grid-{kind} td[data-layer="{layer}"][data-head="{head}"] button')
    page.wait_for_function(
        "() => !document.querySelector('#head-caption').hidden"
        " && !document.querySelector('#translate').disabled"
    )
    return answer.value.request.post_data_json, answer.value.json()["translations"][0]["attention"]


@pytest.mark.slow
def test_heads_view_shows_every_head_by_role_and_one_heads_heat_map(heads_page, heads_model_dir):
    page = heads_page
    report = json.loads((heads_model_dir / "heads.json").read_text(encoding="utf-8"))
    model = load_config(heads_model_dir / "config.yaml").model
    page.fill("#source", SENTENCE)  # nothing translated yet: a click on a head translates it
    page.click("#tab-heads")
    page.wait_for_selector("#heads-grids table")
    assert page.get_attribute("#tab-heads", "aria-selected") == "true"
    assert page.is_hidden("#attention") and page.is_visible("#heads")

    # a grid per kind, layers x heads, every cell in its role's colour (the legend's)
    layers = {"encoder_self": model.encoder_layers, "decoder_self": model.decoder_layers,
              "cross": model.decoder_layers}  # fmt: skip
    for kind, count in layers.items():
        assert page.locator(f"#heads-grid-{kind} tbody tr").count() == count
        assert page.locator(f"#heads-grid-{kind} td.head-cell").count() == count * model.heads
    colour = "e => getComputedStyle(e).backgroundColor"
    swatches = {
        role: page.eval_on_selector(f'#heads-legend .role-swatch[data-role="{role}"]', colour)
        for role in HEAD_ROLES
    }
    assert len(set(swatches.values())) == len(HEAD_ROLES)
    for description in HEAD_ROLES.values():
        assert description in page.text_content("#heads-legend")
    assert "positional 0.5" in page.text_content("#heads-legend")  # the thresholds
    cells = {(c["kind"], c["layer"], c["head"]): c for c in page.evaluate(CELLS)}
    assert len(cells) == len(report["heads"]) == 3 * 2 * model.heads
    for entry in report["heads"]:
        cell = cells[entry["kind"], entry["layer"], entry["head"]]
        importance = entry["importance"]["masking_bleu"]
        importance = entry["importance"]["gradient"] if importance is None else importance
        assert cell["number"] == f"{importance:.2f}" and cell["role"] == entry["role"]
        if entry["pruned"]:
            assert cell["disabled"] and cell["label"] == "pruned"
            assert cell["colour"] not in swatches.values()
        else:
            assert not cell["disabled"] and cell["label"] == entry["role"]
            assert cell["colour"] == swatches[entry["role"]]
    assert [key for key, cell in cells.items() if cell["pruned"]] == [PRUNED]

    # a cross-attention head after the pruned one: its map is [layer][index], not [layer][head]
    entry = next(
        h for h in report["heads"] if h["kind"] == "cross" and h["layer"] == 1 and h["head"] == 2
    )
    assert entry["index"] == 1
    body, attention = click_head(page, "cross", 1, 2)
    assert body["text"] == SENTENCE and "cross" in body["attention_kinds"]
    translator = Translator.load(heads_model_dir)
    expected = translator.translate([SENTENCE])[0]
    produced = translator.tokenizer.target_pieces(expected.hypotheses[0][1].tokens)
    source_ids = translator.tokenizer.encode_source([SENTENCE])[0]
    assert page.locator("#heatmap th.target-piece").count() == len(produced) + 1
    assert page.locator("#heatmap th.source-piece").count() == len(source_ids)
    caption = page.text_content("#head-caption")
    assert f"cross-attention, layer 2, head 3: {entry['role']}" in caption
    np.testing.assert_allclose(shown_weights(page), np.array(attention["cross"][1][1]), atol=6e-4)
    assert np.abs(np.array(attention["cross"][1][2]) - attention["cross"][1][1]).max() > 0.01
    assert page.input_value("#head") == "1"  # the index, named by the original number
    assert page.locator("#head option:checked").text_content() == "3"
    chosen = page.locator("#heads-grids td.chosen")
    assert chosen.count() == 1 and chosen.get_attribute("data-head") == "2"

    # an encoder head: the same sentence again, with the encoder's attention this time
    body, attention = click_head(page, "encoder_self", 0, 1)
    assert body["text"] == SENTENCE and "encoder_self" in body["attention_kinds"]
    assert page.locator("#heatmap th.target-piece").count() == len(source_ids)
    assert page.locator("#heatmap th.source-piece").count() == len(source_ids)
    assert "encoder self-attention, layer 1, head 2" in page.text_content("#head-caption")
    np.testing.assert_allclose(
        shown_weights(page), np.array(attention["encoder_self"][0][1]), atol=6e-4
    )

    # the translation view shows the same map, named
    page.click("#tab-translation")
    assert (
        page.is_visible("#result") and page.is_visible("#head-caption") and page.is_hidden("#heads")
    )


@pytest.mark.slow
def test_heads_view_without_heads_json_says_how_to_make_one(page):
    page.click("#tab-heads")
    page.wait_for_function(
        "document.querySelector('#heads-message').textContent.includes('rosetta heads')"
    )
    assert page.is_visible("#heads-message")
    assert "rosetta heads MODEL_DIR --src FILE --ref FILE -o MODEL_DIR" in page.text_content(
        "#heads-message"
    )
    assert page.locator("#heads-grids td").count() == 0


def pruned_attention(rows: int, cols: int) -> list:
    """Cross-attention of a pruned model: 4 heads in layer 0, 2 in layer 1; every
    weight different (layer, index, row, column)."""
    return [
        [[[round(0.4 * layer + 0.1 * index + 0.02 * r + 0.005 * c, 3) for c in range(cols)]
          for r in range(rows)] for index in range(heads)]
        for layer, heads in enumerate((4, 2))
    ]  # fmt: skip


@pytest.mark.slow
def test_a_pruned_models_layers_differ_in_heads(page):
    """heads.json and the attention of a pruned model (routed: the page never assumes
    that every layer has as many heads)."""
    heads = [
        {"kind": "cross", "layer": layer, "head": head, "index": index, "role": "alignment",
         "importance": {"masking_bleu": None, "gradient": 0.5}, "pruned": index is None}
        for layer, indices in enumerate(([0, 1, 2, 3], [None, 0, None, 1]))
        for head, index in enumerate(indices)
    ]  # fmt: skip
    roles = {"alignment": "follows the source"}
    report = {"version": 1, "model": "pruned", "arch": "transformer", "sentences": 3,
              "thresholds": {}, "roles": roles, "heads": heads}  # fmt: skip
    source, target = ["▁a", "▁b", "▁c"], ["▁x", "<eos>"]
    attention = {"source_pieces": source, "target_pieces": target,
                 "decoder_inputs": ["<bos>", "▁x"], "cross": pruned_attention(2, 3)}  # fmt: skip
    answer = {"translations": [{"source": "a b c", "text": "x", "hypotheses": [],
              "attention": attention, "search": None, "constraints": []}],
              "engine": "torch", "search": {}}  # fmt: skip
    page.route("**/v1/heads", lambda route: route.fulfill(json=report))
    page.route("**/v1/translate", lambda route: route.fulfill(json=answer))
    page.fill("#source", "a b c")
    page.click("#tab-heads")
    page.wait_for_selector("#heads-grid-cross")
    assert page.locator("#heads-grid-cross td.head-cell").count() == 2 * 4
    assert page.locator("#heads-grid-cross td.head-cell.pruned button:disabled").count() == 2

    click_head(page, "cross", 1, 3)  # the last head of layer 2: index 1 of 2
    np.testing.assert_allclose(shown_weights(page), np.array(attention["cross"][1][1]), atol=6e-4)
    assert "layer 2, head 4: alignment" in page.text_content("#head-caption")
    assert page.locator("#head option").all_text_contents() == ["average", "2", "4"]
    page.select_option("#layer", value="0")  # layer 1 has all 4 heads
    assert page.locator("#head option").all_text_contents() == ["average", "1", "2", "3", "4"]
    page.select_option("#head", label="4")
    np.testing.assert_allclose(shown_weights(page), np.array(attention["cross"][0][3]), atol=6e-4)
    assert "layer 1, head 4" in page.text_content("#head-caption")
    page.select_option("#head", label="average")
    mean = np.mean(attention["cross"][0], axis=0)
    np.testing.assert_allclose(shown_weights(page), mean, atol=6e-4)
    assert page.is_hidden("#head-caption")
