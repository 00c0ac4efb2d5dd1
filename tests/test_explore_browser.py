"""`tokentrail explore` in a real browser: a run made with the CLI and the embedded model, the server
started as a user starts it, and the page driven in headless Chromium (Playwright pointed at the system's
/usr/bin/chromium; nothing is downloaded).

Checks the stored map, a live trace (readings, layer slider, category toggles, escaping of an HTML-like
prompt), a steering comparison, adding the prompt to the run, the status line's own timing, that the page asks
nothing of any other host and logs no error, and that Ctrl-C stops the server cleanly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOKENTRAIL = Path(sys.executable).parent / "tokentrail"
READY_TIMEOUT_S = 120
# HTML-like on purpose: the page must show it as text, never create a <b> element from it.
HTML_PROMPT = "def <b>add</b>(a, b): return a +"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        message = f"needs headless Chromium at {CHROMIUM}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _wait_ready(base: str, server: subprocess.Popen, log: Path) -> dict:
    """Poll /api/info until the model is ready (bounded); fail with the server's log if it dies or gives
    up."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    info: dict = {}
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"tokentrail explore exited with {server.returncode}:\n{log.read_text()}")
        try:
            info = _get_json(base + "/api/info")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
            continue
        if info["model_status"] == "ready":
            return info
        if info["model_status"] == "unavailable":
            pytest.fail(f"explore could not load the run's model: {info['model_problem']}")
        time.sleep(0.25)
    pytest.fail(f"explore was not ready within {READY_TIMEOUT_S} s (last /api/info: {info})")


@pytest.fixture(scope="module")
def explore(tmp_path_factory):
    """A seed-spectrum run traced by the CLI, served by `tokentrail explore`; Ctrl-C must stop it cleanly."""
    _need_chromium()
    root = tmp_path_factory.mktemp("explore")
    run_dir = root / "run"
    command = [str(TOKENTRAIL), "trace", "--preset", "seed-spectrum", "--out", str(run_dir), "--quiet"]
    made = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    port = _free_port()
    log = root / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(TOKENTRAIL), "explore", str(run_dir), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        info = _wait_ready(base, server, log)
        yield {"base": base, "info": info, "map": _get_json(base + "/api/map"), "run_dir": run_dir}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail(f"tokentrail explore did not stop within 10 s of Ctrl-C:\n{log.read_text()}")
        assert code == 0, f"Ctrl-C stopped tokentrail explore with {code}:\n{log.read_text()}"


def _table(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => Array.from(r.cells, c => c.textContent.trim()))")


def test_explore_page_in_chromium(explore, tmp_path):
    from playwright.sync_api import sync_playwright

    categories = explore["info"]["categories"]
    n_map_layers = len(explore["map"]["layers"])
    requests: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(30_000)
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(explore["base"] + "/")

            # The stored map: one line per stored prompt, coloured by category.
            page.wait_for_selector("html[data-map=drawn]")
            stored = page.evaluate("""() => document.getElementById('map-plot').data
                .filter(t => t.meta && t.meta.kind === 'stored').length""")
            assert stored == explore["info"]["n_prompts"]
            assert page.locator("#category-toggles input[type=checkbox]").count() == len(categories)
            page.wait_for_function("!document.getElementById('trace-button').disabled")
            assert page.locator("body b").count() == 0

            # A live prompt, HTML-like: drawn (full line, after its animation) and shown as text.
            page.fill("#prompt-input", HTML_PROMPT)
            page.click("#trace-button")
            page.wait_for_selector("#live-list li[data-kind=trace][data-state=drawn]")
            live = page.evaluate("""() => document.getElementById('map-plot').data
                .filter(t => t.meta && t.meta.kind === 'live')
                .map(t => ({n: t.x.length, hover: t.hovertext[0]}))""")
            assert len(live) == 1 and live[0]["n"] == n_map_layers
            assert "&lt;b&gt;" in live[0]["hover"] and "<b>" not in live[0]["hover"]
            assert page.locator("body b").count() == 0
            assert page.locator("#live-list .live-text").first.text_content() == HTML_PROMPT
            # The page's own timing, in its status line (the figure is measured in `make bench`, not here).
            timing = re.search(r"prompt → trajectory on the map in (\d+) ms", page.text_content("#status"))
            assert timing, page.text_content("#status")
            print(f"page: prompt -> trajectory on the map in {timing.group(1)} ms")

            # Readings at the slider's layer: nearest stored prompts and the logit lens's top 5.
            nearest = _table(page, "#nearest-table")
            assert len(nearest) >= 1
            for _id, category, _text, cosine in nearest:
                assert category in categories
                assert -1.0 <= float(cosine) <= 1.0
            lens = _table(page, "#lens-table")
            assert len(lens) == 5
            assert all(0.0 <= float(row[2]) <= 1.0 for row in lens)
            assert "axis score" in page.text_content("#axis-score")
            assert page.text_content("#bifurcation").strip()

            # The layer slider moves the readings (and the highlighted cloud) to another layer.
            layer = 7 if page.input_value("#layer-slider") != "7" else 8
            page.evaluate("""(layer) => { const slider = document.getElementById('layer-slider');
                slider.value = String(layer); slider.dispatchEvent(new Event('input', {bubbles: true})); }""",
                          layer)
            assert page.text_content("#readings-layer") == f"layer {layer}"
            assert page.get_attribute("#nearest-table", "data-layer") == str(layer)
            page.wait_for_function("""(layer) => document.getElementById('map-plot').data
                .some(t => t.meta && t.meta.kind === 'layer' && t.meta.layer === layer)""", arg=layer)

            # A category toggle hides that category's lines and only those.
            toggle = page.locator("#category-toggles input[type=checkbox]").first
            hidden = toggle.get_attribute("data-category")
            toggle.uncheck()
            page.wait_for_function("""(category) => document.getElementById('map-plot').data
                .filter(t => t.meta && t.meta.kind === 'stored')
                .every(t => (t.meta.category === category) === (t.visible === false
                                                               || t.visible === 'legendonly'))""", arg=hidden)

            # One steering comparison: both continuations shown, both trajectories on the map.
            page.click("#steer-button")
            page.wait_for_function("""() => document.getElementById('baseline-text').textContent.trim() !== ''
                && document.getElementById('steered-text').textContent.trim() !== ''""", timeout=60_000)
            page.wait_for_selector("#live-list li[data-kind=steer][data-state=drawn]")
            kinds = page.evaluate("""() => document.getElementById('map-plot').data
                .filter(t => t.meta).map(t => t.meta.kind)""")
            assert "baseline" in kinds and "steered" in kinds

            # Adding the prompt in the box to the run (a throwaway run: it is this module's own).
            page.fill("#store-category", categories[0])
            page.click("#store-button")
            page.wait_for_function("document.getElementById('store-message').textContent.includes('added')")
            assert f"{explore['info']['n_prompts'] + 1} prompts" in page.text_content("#store-message")
            listed = json.loads((explore["run_dir"] / "run.json").read_text())["prompts"]["items"]
            assert listed[-1]["text"] == HTML_PROMPT and listed[-1]["category"] == categories[0]
            screenshot = tmp_path / "explore.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("TOKENTRAIL_SCREENSHOT"):
                shutil.copyfile(screenshot, os.environ["TOKENTRAIL_SCREENSHOT"])
            assert "ms" in page.text_content("#status")
        finally:
            browser.close()

    assert not console_errors, console_errors
    assert not page_errors, page_errors
    foreign = [url for url in requests
               if not url.startswith(("data:", "blob:")) and urlparse(url).hostname not in LOCAL_HOSTS]
    assert not foreign, foreign
