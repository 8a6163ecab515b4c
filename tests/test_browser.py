"""`wit-build serve` and the stats report in a real headless chromium (Debian's chromium and
chromium-driver, driven by selenium): thumbnails decode, filters show the counts SQL gives, no
console errors, and hostile captions, URLs, query texts and run paths run no script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from browse_run import (
    EXPECTED_STATUS,
    QUERIES,
    hostile_dir,
    index_cache,  # noqa: F401  (autouse: the indexes go to a tmp cache)
    write_run,
)
from wit_builder.browse import Browser
from wit_builder.catalog import connect
from wit_builder.serve import create_app

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]


def _skip_reason() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "needs Debian's chromium and chromium-driver (.ci/system_deps.sh installs them as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -c constraints.txt -e .[dev])"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()  # ends chromedriver and the chromium it started


def _serve(run_dir: str):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(Browser(run_dir)), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(run dir, base url) of the plain run, served on a free loopback port."""
    run = write_run(str(tmp_path_factory.mktemp("browser_run")))
    server, thread = _serve(run)
    yield run, f"http://127.0.0.1:{server.port}"
    server.shutdown()
    thread.join(10)
    server.server_close()


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    run = write_run(hostile_dir(str(tmp_path_factory.mktemp("browser_hostile"))), hostile=True)
    server, thread = _serve(run)
    yield run, f"http://127.0.0.1:{server.port}"
    server.shutdown()
    thread.join(10)
    server.server_close()


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _total(driver) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.ID, "total").text)


# in the page: each <img>'s natural size, and the spread of its pixels' values drawn on a canvas
IMAGE_CHECK = """
return Array.from(document.images).map(function (img) {
  var c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  var spread = -1;
  if (img.complete && img.naturalWidth > 0) {
    var ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    var d = ctx.getImageData(0, 0, c.width, c.height).data, lo = 255, hi = 0;
    for (var i = 0; i < d.length; i += 4) {
      for (var k = 0; k < 3; k++) { lo = Math.min(lo, d[i+k]); hi = Math.max(hi, d[i+k]); }
    }
    spread = hi - lo;
  }
  return [img.getAttribute('src'), img.complete, img.naturalWidth, spread];
});
"""


def _images(driver) -> list[list]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)")
    )
    return driver.execute_script(IMAGE_CHECK)


def test_grid_shows_decoded_thumbnails(driver, site):
    run, base = site
    driver.get_log("browser")  # start with an empty console log
    driver.get(base + "/?status=kept")
    assert _total(driver) == EXPECTED_STATUS["kept"]
    images = [i for i in _images(driver) if i[0].startswith("/image/")]
    assert len(images) == EXPECTED_STATUS["kept"]
    for src, complete, width, spread in images:
        assert complete and width == 64, src
        assert spread > 60, f"{src} is blank"
    driver.get(base + "/")
    assert _total(driver) == sum(EXPECTED_STATUS.values())
    assert all(i[2] > 0 for i in _images(driver) if i[0].startswith("/image/"))
    assert _console_errors(driver) == []


def test_filters_by_query_and_reason_match_sql(driver, site):
    from selenium.webdriver.common.by import By

    run, base = site
    con = connect(run)
    driver.get_log("browser")
    driver.get(base + "/queries")
    for qid in range(len(QUERIES)):  # click through from the query distribution page
        driver.get(base + "/queries")
        driver.find_element(By.CSS_SELECTOR, f'#dist a[href="/?q={qid}"]').click()
        want = con.execute("SELECT count(*) FROM samples WHERE query_id = ?", [qid]).fetchall()[0][0]
        assert _total(driver) == want > 0, qid
    for reason in ("duplicate_exact", "too_small", "http_404"):
        driver.get(base + "/")
        link = driver.find_element(By.CSS_SELECTOR, f'#facet-reason a[data-value="{reason}"]')
        shown_on_link = int(link.get_attribute("data-count"))
        link.click()
        want = con.execute(
            "SELECT count(*) FROM samples s LEFT JOIN filtered f USING (key) WHERE f.drop_reason = ? OR s.error = ?",
            [reason, reason],
        ).fetchall()[0][0]
        assert _total(driver) == shown_on_link == want > 0, reason
        assert len(driver.find_elements(By.CSS_SELECTOR, "#grid figure")) == want
    assert _console_errors(driver) == []


def test_the_check_can_see_a_payload_run(driver):
    """Control: the same check on a page that does not escape sees the payload run."""
    driver.get("data:text/html,<title>t</title><img src=x onerror=\"document.title='pwned'\">")
    assert driver.title == "pwned"


def test_hostile_payloads_do_not_run_in_the_browser(driver, hostile_site):
    from selenium.webdriver.common.by import By

    run, base = hostile_site
    driver.get_log("browser")
    driver.get(base + "/")
    title = driver.title
    assert title == "samples — wit-build serve"
    assert driver.find_element(By.ID, "run-dir").text == run  # the path is shown, as text
    keys = [e.get_attribute("data-key") for e in driver.find_elements(By.CSS_SELECTOR, "#grid figure")]
    assert len(keys) == sum(EXPECTED_STATUS.values())
    pages = ["/", "/queries", "/queries?end=tail", "/?text=%3Cscript%3E", "/?q=0"] + [
        f"/sample/{k}?wide=1" for k in keys
    ]
    for page in pages:
        driver.get(base + page)
        assert "pwned" not in driver.title, page
        # only http(s) links: no javascript: href survived as a link
        hrefs = [a.get_attribute("href") or "" for a in driver.find_elements(By.TAG_NAME, "a")]
        assert all(h.startswith(("http://", "https://")) for h in hrefs), page
    assert "pwned" not in driver.title
    assert _console_errors(driver) == []


@pytest.mark.timeout(180)
def test_hostile_payloads_do_not_run_in_the_report(driver, hostile_site):
    run, _ = hostile_site
    done = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "stats", run],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr
    report = Path(run, "report", "report.html")
    assert report.exists()
    assert "&lt;script&gt;document.title=" in report.read_text()  # the payloads reached the page, as text
    driver.get(report.as_uri())
    assert driver.title and "pwned" not in driver.title
    hrefs = [a.get_attribute("href") or "" for a in driver.find_elements("tag name", "a")]
    assert not [h for h in hrefs if h.lower().startswith("javascript:")]
