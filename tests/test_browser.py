"""End to end in a real browser: Debian's Chromium driven by Playwright against uvicorn on loopback.

Uploads an image through the page, waits for the AE and VAE columns, asks the VAE for candidates,
clicks a result, and saves screenshots to tests/artifacts/ for a person to look at (desktop and a
390x844 phone window); over a library of photo-sized JPEGs, counts what a results page of 16 tiles
transfers. Skips only when /usr/bin/chromium is missing (CI installs it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from embedsearch.engine import Engine
from embedsearch.http.app import create_app
from helpers import live_server, photo_jpeg, results_page_costs

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
K = 8  # the page's default number of results per column
TILES = 16  # photos on one results page (both columns show the same 16 when there is one model)
PHOTOS = TILES + 2  # the query, and more than TILES others
#: What a results page of 16 photo tiles (page, models, upload, two searches, the tiles) may transfer.
PAGE_BUDGET = 1_000_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium to run the browser test"
    ),
]


@dataclass
class Site:
    url: str  # open service
    guarded_url: str  # the same library, with a token for writes
    data: Path


@pytest.fixture(scope="module")
def site(trained: Engine, trained_data: Path) -> Iterator[Site]:
    """Running services over the module's ``trained`` library (pixels, an AE and a VAE over shapes)."""
    with live_server(create_app(trained)) as url, live_server(create_app(trained, token="t0ken")) as guarded:
        yield Site(url, guarded, trained_data)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


def open_page(
    browser: Any, url: str, width: int, height: int, ready: str = "body[data-ready=true]"
) -> tuple[Any, list[str]]:
    """A fresh page on the site, with every console error and page error collected."""
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(60_000)  # CI machines are small and may be busy
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(url)
    page.locator(ready).first.wait_for()
    return page, problems


def search_through_page(page: Any, image: Path) -> None:
    page.set_input_files("#file", str(image))
    for slot in ("a", "b"):
        page.locator(f"#column-{slot} .result").nth(K - 1).wait_for()


def test_search_generate_and_click_through_in_a_browser(site: Site, browser: Any) -> None:
    data = site.data
    page, problems = open_page(browser, site.url, 1280, 900)
    assert page.input_value("#model-a") == "ae" and page.input_value("#model-b") == "vae"
    assert "AE" in page.inner_text("#column-a .model-facts") and "VAE" in page.inner_text("#column-b .model-facts")

    search_through_page(page, data / "star" / "star-0003.png")
    assert re.search(r"image #\d+", page.inner_text("#query-info"))
    for slot in ("a", "b"):
        results = page.locator(f"#column-{slot} .result")
        assert results.count() == K
        labels = results.locator(".label").all_inner_texts()
        distances = [float(d) for d in results.locator(".distance").all_inner_texts()]
        assert all(labels) and distances == sorted(distances)
        assert results.first.locator("img").evaluate("img => img.complete && img.naturalWidth") == 28

    page.click("#gen-go")
    page.locator(".candidate").nth(7).wait_for()
    assert page.locator(".candidate .neighbours .hit").count() == 8 * 3
    assert page.locator(".candidate img.generated").first.evaluate("img => img.naturalWidth") == 28
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-search.png"), full_page=True)

    before = page.inner_text("#query-info")
    clicked = page.locator("#column-b .result .hit").first
    title = clicked.get_attribute("title") or ""
    clicked.click()
    page.wait_for_function("before => document.querySelector('#query-info').textContent !== before", arg=before)
    assert title.split(" ")[0] in page.inner_text("#query-info")
    page.locator("#column-a .result").nth(K - 1).wait_for()
    assert not problems, problems


def test_phone_sized_window_stacks_the_columns(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 390, 844)
    search_through_page(page, site.data / "circle" / "circle-0005.png")
    a, b = page.locator("#column-a").bounding_box(), page.locator("#column-b").bounding_box()
    assert b["y"] >= a["y"] + a["height"] - 1  # stacked, not side by side
    assert a["width"] <= 390 and page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    page.click("#gen-go")
    page.locator(".candidate").nth(7).wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-search-phone.png"), full_page=True)
    assert not problems, problems


def test_without_the_token_the_page_searches_by_bytes_and_asks_for_it(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.guarded_url, 1280, 900)
    search_through_page(page, site.data / "ring" / "ring-0002.png")  # upload refused: 401, then search by bytes
    assert page.is_visible("#token") and "not stored" in page.inner_text("#query-info")
    assert page.is_disabled("#gen-go")
    assert page.locator("#column-b .result .label").first.inner_text() == "ring"
    page.fill("#token", "t0ken")
    page.press("#token", "Enter")  # change event: the page adds the image with the token
    page.wait_for_function("() => /image #\\d+/.test(document.querySelector('#query-info').textContent)")
    assert page.is_enabled("#gen-go")
    assert [p for p in problems if "401" not in p] == []  # the refused upload is the only error logged


def test_api_docs_render_offline(site: Site, browser: Any) -> None:
    """Swagger UI at /docs comes from the package: it renders with no network (Chromium here has none)."""
    page, problems = open_page(browser, site.url + "/docs", 1280, 900, ready=".opblock")
    assert "/api/search" in page.inner_text("body")
    assert not problems, problems


@pytest.fixture(scope="module")
def photo_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A service over 2000x1500 photo-like JPEGs (~0.8 MB each) indexed with pixels (both columns)."""
    data = tmp_path_factory.mktemp("photos")
    for i in range(PHOTOS):
        (data / f"photo-{i:02d}.jpg").write_bytes(photo_jpeg(i, orientation=6 if i % 5 == 4 else None))
    with Engine(tmp_path_factory.mktemp("photo-library") / "home") as engine:
        engine.index(str(data), "pixels", workers=0)
        with live_server(create_app(engine)) as url:
            yield Site(url, url, data)


def test_a_results_page_of_16_photos_transfers_under_1_mb_of_thumbnails(photo_site: Site, browser: Any) -> None:
    """The tiles are thumbnails, not the originals (16 x 0.8 MB); the paint time is printed, not asserted."""
    for run in ("thumbnails made now", "thumbnails cached"):
        context = browser.new_context(viewport={"width": 1280, "height": 900})  # an empty browser cache
        page = context.new_page()
        page.set_default_timeout(60_000)
        sent, seconds, sources = results_page_costs(page, photo_site.url, photo_site.data / "photo-03.jpg", TILES)
        print(f"\nresults page of {len(set(sources))} photos ({run}): {sent / 1e3:.0f} kB, painted in {seconds:.2f} s")
        assert len(set(sources)) == TILES and all(re.fullmatch(r"/api/images/\d+/thumb", s) for s in sources)
        assert sent <= PAGE_BUDGET
        context.close()
