"""The evaluation report in a real headless browser: the OS's Chromium (``GECO_CHROMIUM``, default
/usr/bin/chromium; .ci/run installs it) driven by Playwright for Python (its own browser downloads are
never used). The page is opened as a file and from a static HTTP server on 127.0.0.1; it must load
without console errors, its 3D viewer (the real build from ``make install``) must draw the generated
Gaussians (non-blank pixels, and different pixels for a different model), and its tables must hold
summary.json's numbers.

WebGL runs on Chromium's software rasterizer (SwiftShader through ANGLE) here: no GPU is needed.
"""
from __future__ import annotations

import functools
import io
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geco.eval import report
from geco.eval.report import write_report
from tests.report_results import VIEW_SETS, make_results

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras: make install")

CHROMIUM = os.environ.get("GECO_CHROMIUM", "/usr/bin/chromium")
# software WebGL for a headless machine without a GPU (Chromium no longer falls back to it silently)
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
READY_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    if not report.VIEWER_BUNDLE.is_file():
        pytest.fail(f"the report's 3D viewer is not built ({report.VIEWER_BUNDLE}): run `make install`")
    root = make_results(tmp_path_factory.mktemp("eval") / "results", objects=("alarm", "teapot"),
                        models=("teacher", "stage1"))
    write_report(root)
    return root


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM}: no Chromium (apt-get install chromium, or set GECO_CHROMIUM)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def http_root(results):
    """The results folder on a static HTTP server (127.0.0.1, an ephemeral port), as a person would share it."""
    handler = functools.partial(_QuietHandler, directory=str(results))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Page:
    """A page with its console errors and uncaught exceptions collected."""

    def __init__(self, browser, url: str):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(url)

    def wait_shown(self, key: str) -> None:
        self.page.wait_for_selector(f'#viewer[data-state="ready"][data-shown="{key}"], #viewer[data-state="error"]',
                                    timeout=READY_TIMEOUT_MS)
        state = self.page.get_attribute("#viewer", "data-state")
        assert state == "ready", f"viewer: {self.page.text_content('#viewer-status')}; {self.errors}"

    def viewer_pixels(self) -> np.ndarray:
        png = self.page.locator("#viewer canvas").screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def _assert_drawn(pixels: np.ndarray) -> None:
    """The canvas is not blank: a real share of non-background pixels, and real variation."""
    non_white = (pixels < 240).any(axis=2).mean()
    assert non_white > 0.02, f"only {non_white:.1%} of the viewer's pixels are not background"
    assert pixels.std() > 10, f"the viewer's pixels hardly vary (std {pixels.std():.1f})"


def test_report_opened_as_a_file(browser, results):
    view = _Page(browser, (results / "report" / "index.html").as_uri())
    try:
        view.wait_shown("alarm/teacher")  # the first model is shown at once
        first = view.viewer_pixels()
        _assert_drawn(first)

        view.page.click('button[data-splat-key="teapot/stage1"]')  # another model, from its own sidecar
        view.wait_shown("teapot/stage1")
        second = view.viewer_pixels()
        _assert_drawn(second)
        assert np.abs(first - second).mean() > 2, "switching models did not change the picture"

        # the tables hold summary.json's numbers
        summary = json.loads((results / "summary.json").read_text())
        cells = view.page.eval_on_selector_all(
            "#table1 td[data-value]", "tds => tds.map(td => [td.dataset.metric, Number(td.dataset.value), td.textContent])")
        shown = {(m, round(v, 9)) for m, v, _ in cells}
        for model in summary["models"]:
            for vs in VIEW_SETS:
                for metric in ("psnr", "ssim", "cd", "viou", "fscore"):
                    assert (metric, round(summary["metrics"][model][f"gso/{vs}/{metric}"], 9)) in shown
        psnr = summary["metrics"]["stage1"]["gso/orbit/psnr"]
        assert [t for m, v, t in cells if m == "psnr" and v == psnr] == [f"{psnr:.2f}"]
        assert view.page.get_attribute("#leakage", "data-clean") == "true"
        assert view.errors == []
    finally:
        view.page.close()


def test_report_from_a_static_server(browser, http_root, results):
    view = _Page(browser, f"{http_root}/report/index.html")
    try:
        view.wait_shown("alarm/teacher")
        _assert_drawn(view.viewer_pixels())
        # every picture on the page loaded (naturalWidth 0 means a broken image)
        broken = view.page.eval_on_selector_all("img", "imgs => imgs.filter(i => !i.naturalWidth).map(i => i.src)")
        assert broken == []
        # the .ply download links reach the results folder's files
        href = view.page.get_attribute('a[href$="stage1.ply"]', "href")
        response = view.page.request.get(f"{http_root}/report/{href}")
        assert response.ok and response.body() == (results / "ply" / "alarm" / "stage1.ply").read_bytes()
        assert view.errors == []
    finally:
        view.page.close()
