"""Makes docs/serve_page.png, the README's picture of the page: serves MODEL_DIR on
127.0.0.1, translates SENTENCE in Debian's headless Chromium (Playwright) with the
search shown, clicks a produced word and saves a full-page screenshot.

    python docs/make_screenshot.py experiments/multi30k_en_de/model \
        "A little girl climbs into a wooden playhouse."
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from rosetta.serve.app import create_app
from rosetta.serve.service import TranslationService

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


def main(model_dir: str, sentence: str, out: Path = Path(__file__).parent / "serve_page.png"):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(TranslationService.load(model_dir)), log_level="warning")
    )
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    while not server.started:
        threading.Event().wait(0.05)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{listener.getsockname()[1]}/")
        page.fill("#source", sentence)
        page.click("#translate")
        page.wait_for_selector("#heatmap th.target-piece")
        page.locator("#heatmap th.target-piece").nth(2).click()
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    server.should_exit = True
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
