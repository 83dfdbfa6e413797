"""The viewer in a real headless browser (Chromium driven by Playwright), where both are installed:
the page loads, its first row is the highest score, the opacity control changes the overlay, and a
dropped-in image comes back with a score. Skipped cleanly when there is no browser."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from scanomaly.viewer import build_app  # noqa: E402

from test_viewer import scored, scored_series  # noqa: E402,F401  (the fixtures)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser_path() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(scored, tmp_path):  # noqa: F811
    yield from _serve(scored[0], tmp_path)


@pytest.fixture
def series_server(scored_series, tmp_path):  # noqa: F811
    yield from _serve(scored_series[0], tmp_path)


def _serve(run, tmp_path):
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(run, workdir=tmp_path / "work"), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the viewer did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page():
    executable = _browser_path()
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        except Exception as exc:  # a browser that cannot start here is an environment matter
            pytest.skip(f"{executable} does not start headless: {exc}")
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_viewer_in_a_browser(server, page, scored):  # noqa: F811
    run, tree, detector = scored
    page.goto(server)
    page.wait_for_selector("tr.row img.overlay")
    scores = [float(v) for v in page.eval_on_selector_all("tr.row", "rows => rows.map(r => r.dataset.score)")]
    csv_scores = [float(line.split(",")[3]) for line in (run / "scores.csv").read_text().splitlines()[1:]]
    assert scores[0] == max(csv_scores) and scores == sorted(scores, reverse=True)

    # the heatmap lies over the scan with the opacity the control sets
    overlay_opacity = "el => getComputedStyle(el).opacity"
    assert page.eval_on_selector("tr.row img.overlay", overlay_opacity) == "0.5"
    page.focus("#opacity")
    page.keyboard.press("End")
    assert page.eval_on_selector("tr.row img.overlay", overlay_opacity) == "1"
    page.keyboard.press("Home")
    assert page.eval_on_selector("tr.row img.overlay", overlay_opacity) == "0"
    page.wait_for_function("() => { const el = document.querySelector('tr.row img.overlay');"
                           " return el.complete && el.naturalWidth > 0; }", timeout=60_000)  # the heatmap is drawn

    # the threshold slider reports sensitivity and specificity (the data has labels)
    assert page.is_visible("#threshold-box")
    assert 0.0 <= float(page.inner_text("#sensitivity")) <= 1.0

    # an image given to the upload control comes back with a score
    image = sorted((tree / "test" / "abnormal").glob("*.png"))[0]
    page.set_input_files("#upload", str(image))
    page.wait_for_selector("#upload-score")
    import torch

    from scanomaly.io import read_image

    expected = float(detector.score(torch.stack([detector.preprocessing.apply(read_image(image)[0])]))[0][0])
    assert float(page.inner_text("#upload-score")) == pytest.approx(expected, rel=1e-4)  # shown to 5 digits
    assert page.eval_on_selector("#upload-result img.overlay", "el => el.src.startsWith('data:image/png')")


def test_a_dicom_series_scrolls_in_a_browser(series_server, page, scored_series):  # noqa: F811
    _, files = scored_series
    page.goto(series_server)
    page.wait_for_selector("input.slice")
    sliders = page.eval_on_selector_all("input.slice", "els => els.map(e => [e.closest('tr').children[1].textContent,"
                                                       " Number(e.value), Number(e.max)])")
    position = {path.name: k for k, path in enumerate(files)}
    assert sorted(name for name, _, _ in sliders) == sorted(position)  # every file of the series, none else
    assert all(value == position[name] and top == len(files) - 1 for name, value, top in sliders)
    # moving a row's slider shows that slice of the series: scan and heatmap
    page.eval_on_selector("input.slice", "el => { el.value = '3'; el.dispatchEvent(new Event('input')); }")
    row = page.query_selector("tr.row:has(input.slice)")
    assert row.eval_on_selector("img.scan", "el => el.getAttribute('src')").endswith("?slice=3")
    assert row.eval_on_selector("img.overlay", "el => el.getAttribute('src')").endswith("heatmap.png?slice=3")
    page.wait_for_function("() => { const el = document.querySelector('tr.row:has(input.slice) img.overlay');"
                           " return el.complete && el.naturalWidth > 0; }", timeout=60_000)
