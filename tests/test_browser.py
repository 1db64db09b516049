"""A real browser opens report.html: headless Chromium through Selenium.

Skips cleanly without selenium, a Chromium binary or its driver (Debian: ``apt install
chromium chromium-driver``). By default it opens a small report made here (the test
page's blobs, real Ogg excerpts); ``TILE2AUDIO_REPORT_HTML=path/report.html`` opens
another one instead (e.g. the demo's), and ``TILE2AUDIO_SCREENSHOT=path.png`` keeps the
screenshot (docs/report_html.png was made that way from ``tile2audio demo``).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no Chromium and chromedriver installed")

AUDIO_STATE = """return Array.from(document.querySelectorAll('audio[src]')).map(
    a => [a.getAttribute('src'), a.readyState, a.duration, a.error ? a.error.code : null]);"""

#: Play the first player; its position once it has moved (or why it did not).
PLAY = """
    const done = arguments[arguments.length - 1];
    const a = document.querySelector('audio[src]');
    a.addEventListener('timeupdate', () => { if (a.currentTime > 0) done(a.currentTime); });
    a.addEventListener('ended', () => done(a.currentTime));
    a.play().catch(e => done(String(e)));
    setTimeout(() => done(`no progress: paused ${a.paused}, readyState ${a.readyState}`), 45000);"""


def _report(tmp_path: Path) -> Path:
    given = os.environ.get("TILE2AUDIO_REPORT_HTML")
    if given:
        return Path(given)
    from test_page import CLUSTER, PROBE, blobs

    from tile2audio.config import ReportConfig
    from tile2audio.report import make_report

    (tmp_path / "in").mkdir()
    make_report(blobs(tmp_path / "in"), tmp_path / "report", PROBE, CLUSTER, title="Browser check",
                progress=False, report_config=ReportConfig(projector=False))
    return tmp_path / "report" / "report.html"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except Exception as exc:  # a driver that does not match the browser, no display libraries ...
        pytest.skip(f"Chromium would not start: {str(exc).splitlines()[0]}")
    yield driver
    driver.quit()


def test_report_html_in_chromium_loads_audio_metadata_and_plays(browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    page = _report(tmp_path)
    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 60).until(lambda d: all(s[1] >= 1 or s[3] for s in d.execute_script(AUDIO_STATE)))
    states = browser.execute_script(AUDIO_STATE)
    assert states, "the page has no audio players"
    for src, ready, duration, error in states:
        assert error is None, f"{src}: media error {error}"
        assert ready >= 1 and duration is not None and math.isfinite(duration) and duration > 0, (src, duration)
    browser.set_script_timeout(60)
    played = browser.execute_async_script(PLAY)
    assert isinstance(played, (int, float)) and played > 0, played
    n_points = browser.execute_script("return document.querySelectorAll('#map circle').length")
    assert n_points > 0
    browser.execute_script("document.getElementById('listen-clusters').scrollIntoView()")
    shot = Path(os.environ.get("TILE2AUDIO_SCREENSHOT") or tmp_path / "report.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
