"""report.html in a real headless browser: the verdict and the headline table are on the first screen.

Drives Debian's `chromium` (installed by .ci/run with apt-get) through Playwright, which is told the browser's
path so it never downloads one. Skipped with the reason where either is missing. The screenshot is kept as a
test artifact in $ES2_TEST_ARTIFACTS (default tests/artifacts/)."""

import os
import shutil
from pathlib import Path

import pytest

from tests.test_report import build_report

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright not installed: pip install -e '.[dev]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 800


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: .ci/run installs it with "
                    "`apt-get install chromium` when run as root on Debian")
def test_headline_table_is_on_the_first_screen(tmp_path):
    path, rows, sentence = build_report(tmp_path)
    artifacts = Path(os.environ.get("ES2_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report_first_screen.png"
    with sync_api.sync_playwright() as p:
        # no sandbox: CI runs as root in a container, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.goto(path.as_uri())
            page.screenshot(path=str(shot))
            headline, shown_verdict = page.locator("#headline"), page.get_by_text(sentence, exact=True)
            assert headline.is_visible() and shown_verdict.is_visible()
            box = headline.bounding_box()
            table_rows = page.locator("#headline tr").count()
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert box["y"] < HEIGHT and box["y"] + box["height"] <= HEIGHT, box  # the whole table, without scrolling
    assert table_rows == len(rows) + 1  # header + one row per figure
