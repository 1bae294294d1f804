"""The web page (`clipsearch ui`) in Debian's headless chromium, driven by Playwright, against a real local stack.

A user's session in one test: pick the dataset, search by text and see the thumbnails load, scroll for a second
page, upload a query image, "More like this" with the keyboard, a 4xx shown as a message, a hostile source path
shown as text, and a phone-width window. Skips without chromium, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clipsearch.aws import aws_client
from clipsearch.datasets import SOURCE_PATH_METADATA, encode_source_path
from test_cli_local_stack import CLIPSEARCH, Cli  # the CLI-driven local stack of the CLI's own e2e tests

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
DATASET = "ui"
PHOTOS = 44  # two full pages of 20 and a short third
HOSTILE_PATH = "<img src=x onerror=alert(1)><script>window.hostileScriptRan=1;alert(2)</script>.jpeg"
HOSTILE_KEY = f"datasets/{DATASET}/hostile/evil.jpeg"
PAGE = 20
ALL_THUMBNAILS_LOADED = """(count) => {
  const images = [...document.querySelectorAll('#results li img')];
  return images.length >= count && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


def _browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason, sync_playwright = "playwright is not installed (pip install -e '.[dev]')", None
    if reason is None and not CHROMIUM.exists():
        reason = f"{CHROMIUM} is absent (apt-get install -y chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir: Path, seed_eval_dir: Path) -> Cli:
    sync_playwright = _browser_or_skip()
    cli = Cli(tmp_path_factory.mktemp("ui-stack-home"))
    cli.sync_playwright = sync_playwright
    started = cli.run("local", "up", "--model-dir", str(tiny_model_dir), "--json", timeout=400)
    assert started.returncode == 0, started.stderr
    try:
        state = json.loads((Path(cli.env["CLIPSEARCH_HOME"]) / "state.json").read_text())
        s3 = aws_client("s3", state["region"], state["s3_endpoint_url"], state["access_key_id"],
                        state["secret_access_key"])
        # As `clipsearch ingest` uploads: the user's path travels as the source-path metadata.
        s3.put_object(
            Bucket=state["bucket"], Key=HOSTILE_KEY, ContentType="image/jpeg",
            Body=(seed_eval_dir / "train" / "beach_1.jpeg").read_bytes(),
            Metadata={SOURCE_PATH_METADATA: encode_source_path(HOSTILE_PATH)},
        )
        folder = tmp_path_factory.mktemp("ui-photos")
        for photo in sorted((seed_eval_dir / "train").glob("*.jpeg"))[:PHOTOS]:
            shutil.copy(photo, folder / photo.name)
        cli.folder = folder
        report = cli.json("ingest", str(folder), "--dataset", DATASET, "--timeout", "180")
        assert report["indexed"] >= PHOTOS, report
        _wait_until_indexed(cli, PHOTOS + 1)
        yield cli
    finally:
        stopped = cli.run("local", "down")
        assert stopped.returncode == 0, stopped.stderr


def _wait_until_indexed(cli: Cli, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while cli.json("dataset", "show", DATASET)["counts"].get("indexed", 0) < count:
        assert time.monotonic() < deadline, f"fewer than {count} images indexed after {timeout} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ui_url(stack: Cli):
    server = subprocess.Popen(
        [str(CLIPSEARCH), "ui", "--port", "0", "--json"], env=stack.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        line = server.stdout.readline()
        assert line, server.stderr.read()
        yield json.loads(line)["url"]
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(stack: Cli):
    with stack.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _result_keys(page) -> list[str]:
    return page.eval_on_selector_all("#results li", "items => items.map((item) => item.dataset.key)")


def _search(page, wait_for: int = PAGE) -> list[str]:
    page.click("#search-button")
    page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=wait_for, timeout=30_000)
    return _result_keys(page)


def test_a_user_session_on_the_page(stack: Cli, ui_url: str, browser, tmp_path: Path, seed_eval_dir: Path):
    # bypass_csp: Playwright's waiting evaluates code, which the page's CSP forbids; the page's own discipline
    # (text, never markup) is what the hostile path below tests, with the CSP out of the way.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    dialogs, page_errors = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(ui_url)

    page.wait_for_selector(f"#dataset option[value='{DATASET}']", state="attached")
    page.select_option("#dataset", DATASET)
    assert page.text_content(f"#dataset option[value='{DATASET}']") == f"{DATASET} ({PHOTOS + 1} images)"
    assert page.text_content("#dataset-status").startswith(f"ready · {PHOTOS + 1} indexed")

    page.fill("#query", "a sunny beach")
    first_page = _search(page)
    assert len(first_page) == PAGE
    scores = [float(text.split()[1]) for text in page.eval_on_selector_all(
        "#results .score", "nodes => nodes.map((node) => node.textContent)")]
    assert scores == sorted(scores, reverse=True)
    thumbnails = page.eval_on_selector_all("#results li img", "images => images.map((image) => image.src)")
    assert all(url.startswith("http://127.0.0.1:") and "/thumbnails/" in url for url in thumbnails)
    screenshot = tmp_path / "ui-results.png"
    page.screenshot(path=str(screenshot))
    print(f"\nscreenshot of the results grid: {screenshot}")

    page.mouse.wheel(0, 20_000)  # the scroll that asks for the next page
    page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=2 * PAGE, timeout=30_000)
    both_pages = _result_keys(page)
    second_page = both_pages[PAGE:]
    assert len(second_page) == PAGE
    assert not set(first_page) & set(second_page)
    assert len(set(both_pages)) == len(both_pages)

    query_photo = stack.folder / "city_3.jpeg"
    page.set_input_files("#image", str(query_photo))
    page.wait_for_selector("#query-image:not([hidden])")
    page.wait_for_function(f"() => document.querySelector('#results li')?.dataset.key === 'datasets/{DATASET}/city_3.jpeg'")
    assert page.text_content("#results li .path") == str(query_photo.resolve())
    assert page.text_content("#query-image-name") == "city_3.jpeg"

    twins = {f"datasets/{DATASET}/beach_1.jpeg", HOSTILE_KEY}  # the same pixels: either may rank first for both
    chosen = next(item for item in page.locator("#results li").all()[2:] if item.get_attribute("data-key") not in twins)
    chosen_key = chosen.get_attribute("data-key")
    chosen.locator("button.more-like-this").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#similar-to:not([hidden])")
    page.wait_for_function(f"() => document.querySelector('#results li')?.dataset.key === {json.dumps(chosen_key)}")
    assert page.is_hidden("#query-image")

    page.click("#clear-similar")
    page.click("#search details summary")
    page.fill("#query", "a sunny beach")
    page.fill("#min-score", "5")
    page.click("#search-button")
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert error.startswith("Error 400 (invalid_min_score): ") and "less than or equal to 1" in error, error
    assert page.locator("#results li").count() == 0

    page.fill("#min-score", "")
    page.fill("#prefix", "hostile/")
    _search(page, wait_for=1)
    assert page.is_hidden("#error")
    assert page.text_content("#results li .path") == HOSTILE_PATH
    assert page.get_attribute("#results li button.more-like-this", "aria-label") == f"More like {HOSTILE_PATH}"
    assert page.locator("#results img[src='x'], #results script").count() == 0
    assert page.evaluate("() => window.hostileScriptRan") is None
    assert dialogs == []

    page.fill("#since", "2999-01-01T00:00")  # ingest time, in the browser's zone
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('No results.')")
    assert page.locator("#results li").count() == 0 and page.is_hidden("#error")

    page.set_viewport_size({"width": 375, "height": 740})
    page.fill("#prefix", "")
    page.fill("#since", "")
    _search(page)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for control in ("#dataset", "#query", "#exclude", "#image", "#prefix", "#since", "#until", "#min-score"):
        assert page.locator(f"label[for='{control[1:]}']").count() == 1, control
    assert page_errors == []
    context.close()
