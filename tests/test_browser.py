"""End to end in a real browser: Debian's Chromium driven by Playwright against uvicorn on loopback.

Searches through the page without storing the query, adds it to the library and deletes it (asking
for the token when the service has one), filters by label and folder, restores a search from its
URL, pages through the library browser, clicks a point of each model's 2-D map, generates (the VAE's
prior and near-query samples, the path between two images in the AE and the VAE), and saves
screenshots to tests/artifacts/ for a person to look at (desktop and a 390x844 phone window); over a
library of photo-sized JPEGs, counts what a results page of 16 tiles transfers. Skips only when
/usr/bin/chromium is missing (CI installs it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from embedsearch.engine import Engine
from embedsearch.http.app import create_app
from helpers import live_server, noise_image, photo_jpeg, png_bytes, results_page_costs

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
#: True once every image the selector names has loaded (for a screenshot with its pictures).
TILES_LOADED = "sel => [...document.querySelectorAll(sel)].every(i => i.complete && i.naturalWidth > 0)"

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


def search_through_page(page: Any, image: Path, k: int = K) -> None:
    """Choose ``image`` in the page's file picker (searched by its bytes) and wait for both columns."""
    page.set_input_files("#file", str(image))  # its change event starts the search (and clears data-searched)
    page.locator("body[data-searched='file']").wait_for(state="attached")
    for slot in ("a", "b"):
        page.locator(f"#column-{slot} .result").nth(k - 1).wait_for()


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/api/stats").json()


def column_ids(page: Any, slot: str) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all(f"#column-{slot} .result", "lis => lis.map(l => l.dataset.id)")]


def wait_for_query(page: Any, image_id: int) -> None:
    """Until the page has searched by stored image ``image_id`` (both columns answered) and the URL names it."""
    page.locator(f"body[data-searched='{image_id}']").wait_for(state="attached")
    assert new_query_param(page.url) == str(image_id)


def new_query_param(url: str) -> str | None:
    return (parse_qs(urlsplit(url).query).get("q") or [None])[0]


def searched(page: Any) -> None:
    """Until both columns have answered the page's latest search."""
    page.locator("body[data-searched]").wait_for(state="attached")


def save(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def noise_file(folder: Path, seed: int) -> Path:
    path = folder / f"noise-{seed}.png"
    path.write_bytes(png_bytes(noise_image(seed, 28, "L")))
    return path


def test_search_does_not_store_and_results_are_named_and_marked(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    assert page.input_value("#model-a") == "ae" and page.input_value("#model-b") == "vae"
    assert "AE" in page.inner_text("#column-a .model-facts") and "VAE" in page.inner_text("#column-b .model-facts")
    models = {o for o in page.eval_on_selector_all("#model-a option", "os => os.map(o => o.value)")}
    assert models == {"ae", "vae", "pixels"}  # any model in either column

    before = stats(site.url)["images"]
    search_through_page(page, site.data / "star" / "star-0003.png")
    assert "not stored" in page.inner_text("#query-info") and page.is_visible("#add-btn")
    assert stats(site.url)["images"] == before  # searching stored nothing
    assert "q=" not in page.url  # an image that is not stored has no id to share
    for slot in ("a", "b"):
        results = page.locator(f"#column-{slot} .result")
        assert results.count() == K
        labels = results.locator(".label").all_inner_texts()
        distances = [float(d) for d in results.locator(".distance").all_inner_texts()]
        names = results.locator(".name").all_inner_texts()
        assert all(labels) and distances == sorted(distances) and all(n.endswith(".png") for n in names)
        assert results.first.locator("img").evaluate("img => img.complete && img.naturalWidth") == 28
    # the results both columns found are starred, and the legend counts them
    both = set(column_ids(page, "a")) & set(column_ids(page, "b"))
    starred = {int(i) for i in page.eval_on_selector_all(".result.agreed", "lis => lis.map(l => l.dataset.id)")}
    assert starred == both and page.locator(".result.agreed .agree").first.is_visible() == bool(both)
    assert page.inner_text("#agree-count").startswith(f"{len(both)} of the results")
    assert page.is_disabled("#gen-go") and "Add the query" in page.inner_text("#gen-why")  # near needs a stored query
    save(page, "browser-search.png")

    clicked = page.locator("#column-b .result").first
    picked = int(clicked.get_attribute("data-id") or -1)
    clicked.locator(".hit").click()
    wait_for_query(page, picked)
    assert page.is_visible("#delete-query") and page.is_enabled("#gen-go")
    page.click("#gen-go")  # the VAE near the (now stored) query
    page.locator(".candidate").nth(7).wait_for()
    assert page.locator(".candidate .neighbours .hit").count() == 8 * 3
    assert page.locator(".candidate img.generated").first.evaluate("img => img.naturalWidth") == 28
    save(page, "browser-generate-near.png")
    assert not problems, problems


def test_add_to_library_then_delete_the_query_and_a_result(site: Site, browser: Any, tmp_path: Path) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    before = stats(site.url)["images"]
    assert page.inner_text("#status").startswith(f"{before} images")
    search_through_page(page, noise_file(tmp_path, 5))
    page.fill("#add-label", "noise-del")
    page.click("#add-btn")
    page.wait_for_function("() => /image #\\d+/.test(document.querySelector('#query-info').textContent)")
    added = int(re.search(r"image #(\d+)", page.inner_text("#query-info")).group(1))  # type: ignore[union-attr]
    assert stats(site.url)["images"] == before + 1 and f"q={added}" in page.url
    page.wait_for_function(
        "n => document.querySelector('#status').textContent.startsWith(n + ' images')", arg=before + 1
    )
    page.click("#delete-query")
    assert page.inner_text("#delete-query") == "Press again to delete"  # asks once more, no dialog
    page.click("#delete-query")
    page.wait_for_function("() => document.querySelector('#query-info').textContent.includes('not stored')")
    assert stats(site.url)["images"] == before and "q=" not in page.url
    page.wait_for_function("n => document.querySelector('#status').textContent.startsWith(n + ' images')", arg=before)

    # a result's own delete button: the only image labelled noise-del, found through the label filter
    page.fill("#add-label", "noise-del")
    page.click("#add-btn")  # stored again
    page.wait_for_function("() => /image #\\d+/.test(document.querySelector('#query-info').textContent)")
    again = int(re.search(r"image #(\d+)", page.inner_text("#query-info")).group(1))  # type: ignore[union-attr]
    search_through_page(page, noise_file(tmp_path, 6), k=1)  # another picture, not stored
    page.select_option("#filter-label", "noise-del")
    page.wait_for_function("id => document.querySelector('#column-a .result')?.dataset.id === String(id)", arg=again)
    tile_delete = page.locator(f"#column-a .result[data-id='{again}'] .del")
    tile_delete.click()
    tile_delete.click()
    page.locator("#column-a .empty").wait_for()
    assert "No results" in page.inner_text("#column-a .results") and stats(site.url)["images"] == before
    assert not problems, problems


def test_the_token_is_asked_for_when_adding(site: Site, browser: Any, tmp_path: Path) -> None:
    page, problems = open_page(browser, site.guarded_url, 1280, 900)
    search_through_page(page, site.data / "ring" / "ring-0002.png")  # reads are open: searched by its bytes
    assert not page.is_visible("#token") and "not stored" in page.inner_text("#query-info")
    assert page.locator("#column-b .result .label").first.inner_text() == "ring"
    search_through_page(page, noise_file(tmp_path, 9))
    page.click("#add-btn")  # 401: the page asks for the token
    page.locator("#token").wait_for()
    assert "token" in page.inner_text("#error")
    page.fill("#token", "t0ken")
    page.press("#token", "Enter")  # change event: the refused add runs again with the token
    page.wait_for_function("() => /image #\\d+/.test(document.querySelector('#query-info').textContent)")
    page.click("#delete-query")
    page.click("#delete-query")  # the token is kept for the session: deleting works at once
    page.wait_for_function("() => document.querySelector('#query-info').textContent.includes('not stored')")
    assert [p for p in problems if "401" not in p] == []  # the refused upload is the only error logged


def test_filters_and_the_url_restore_a_search(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    star = httpx.get(site.url + "/api/images", params={"label": "star", "limit": 1}).json()["images"][0]["id"]
    page.goto(f"{site.url}/?q={star}")  # a bookmarked search
    wait_for_query(page, star)
    page.select_option("#model-a", "pixels")
    page.fill("#k", "5")
    page.press("#k", "Enter")
    page.select_option("#filter-label", "ring")
    page.wait_for_function("() => new URLSearchParams(location.search).get('label') === 'ring'")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.columns .result .label')].every(l => l.textContent === 'ring')"
        " && document.querySelectorAll('#column-a .result').length === 5"
    )
    searched(page)
    url, shown = page.url, {slot: column_ids(page, slot) for slot in ("a", "b")}
    assert {"a=pixels", "b=vae", "k=5", f"q={star}", "label=ring"} <= set(url.split("?")[1].split("&"))

    other, more = open_page(browser, url, 1280, 900)  # the shared URL, in a fresh page
    wait_for_query(other, star)
    other.wait_for_function("() => document.querySelectorAll('#column-b .result').length === 5")
    assert other.input_value("#model-a") == "pixels" and other.input_value("#filter-label") == "ring"
    assert {slot: column_ids(other, slot) for slot in ("a", "b")} == shown

    # the folder filter: only files under the star folder
    other.fill("#filter-under", str(site.data / "star"))
    other.select_option("#filter-label", "")
    other.press("#filter-under", "Enter")
    other.wait_for_function(
        "() => [...document.querySelectorAll('.columns .result .label')].every(l => l.textContent === 'star')"
    )
    assert "under=" in other.url
    first = other.locator("#column-a .result").first
    picked = int(first.get_attribute("data-id") or -1)
    first.locator(".hit").click()  # a new query: a new entry in the history
    wait_for_query(other, picked)
    other.go_back()  # and back: the star again, with its filters
    wait_for_query(other, star)
    assert other.input_value("#filter-label") == "" and other.input_value("#filter-under") == str(site.data / "star")
    assert not problems + more, problems + more


def test_library_browser_pages_and_label_filter(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    total = stats(site.url)["images"]
    page.click("#tab-library")
    page.locator(".lib-tile").nth(23).wait_for()
    first = [int(i) for i in page.eval_on_selector_all(".lib-tile", "ts => ts.map(t => t.dataset.id)")]
    assert len(first) == 24 and page.inner_text("#lib-pos") == f"1–24 of {total}" and "view=library" in page.url
    page.click("#lib-next")
    page.wait_for_function("() => document.querySelector('#lib-pos').textContent.startsWith('25–')")
    second = [int(i) for i in page.eval_on_selector_all(".lib-tile", "ts => ts.map(t => t.dataset.id)")]
    assert second and not set(second) & set(first) and page.is_disabled("#lib-next") == (total <= 48)
    page.select_option("#lib-label", "star")
    page.wait_for_function("() => document.querySelector('#lib-pos').textContent === '1–6 of 6'")
    assert set(page.locator(".lib-tile .label").all_inner_texts()) == {"star"}
    assert all(n.startswith("star-") for n in page.locator(".lib-tile .name").all_inner_texts())
    page.wait_for_function(TILES_LOADED, arg=".lib-tile img")
    save(page, "browser-library.png")
    tile = page.locator(".lib-tile").nth(2)
    picked = int(tile.get_attribute("data-id") or -1)
    tile.locator(".hit").click()
    wait_for_query(page, picked)
    assert page.is_visible("#view-search") and not page.is_visible("#view-library")
    assert not problems, problems


def test_the_map_of_each_model_and_a_click_searches(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    page.click("#tab-map")
    for model in ("vae", "pixels", "ae"):
        page.select_option("#map-model", model)
        vectors = {m["name"]: m["vectors"] for m in httpx.get(site.url + "/api/models").json()["models"]}[model]
        page.wait_for_function(
            "([m, n]) => document.querySelector('#map-info').textContent.startsWith(m + ':') && "
            "document.querySelectorAll('#map-canvas circle').length === n",
            arg=[model, vectors],
        )
    legend = page.locator("#map-legend li").all_inner_texts()
    assert len(legend) >= 8 and any(t.startswith("star (") for t in legend)
    colours = set(page.eval_on_selector_all("#map-canvas circle", "cs => cs.map(c => c.getAttribute('fill'))"))
    assert len(colours) >= 8  # coloured by label
    save(page, "browser-map.png")
    top = page.locator("#map-canvas circle").last  # drawn last: nothing covers it
    picked = int(top.get_attribute("data-id") or -1)
    top.click()
    wait_for_query(page, picked)
    page.click("#tab-map")  # and by keyboard: a small map's points are tab stops
    first = page.locator("#map-canvas circle").first
    keyed = int(first.get_attribute("data-id") or -1)
    first.focus()
    page.keyboard.press("Enter")
    wait_for_query(page, keyed)
    assert not problems, problems


def test_generation_between_two_images_in_the_ae_and_the_vae(site: Site, browser: Any) -> None:
    page, problems = open_page(browser, site.url, 1280, 900)
    star, ring = (
        httpx.get(site.url + "/api/images", params={"label": s, "limit": 1}).json()["images"][0]["id"]
        for s in ("star", "ring")
    )
    page.goto(f"{site.url}/?q={ring}&label=star")
    wait_for_query(page, ring)
    page.locator(f"#column-a .result[data-id='{star}'] .as-b").click()  # B
    assert page.input_value("#gen-mode") == "between" and f"#{star}" in page.inner_text("#b-slot")
    page.select_option("#filter-label", "")  # back to all results
    page.click("#gen-go")
    page.locator(".gen-row").nth(1).wait_for()
    rows = page.locator(".gen-row")
    assert [rows.nth(i).get_attribute("data-model") for i in range(2)] == ["ae", "vae"]
    for i in range(2):
        assert rows.nth(i).locator(".candidate").count() == 6  # the default steps, ends included
        assert rows.nth(i).locator(".neighbours .hit").count() == 6 * 3
    save(page, "browser-generate-between.png")
    page.select_option("#gen-mode", "prior")
    page.click("#gen-go")
    page.wait_for_function("() => document.querySelector('.gen-row h3')?.textContent.includes('prior')")
    assert page.locator(".candidate").count() == 8
    assert not problems, problems


@pytest.mark.parametrize("view", ["search", "library", "map"])
def test_phone_sized_window(site: Site, browser: Any, view: str) -> None:
    page, problems = open_page(browser, site.url, 390, 844)
    if view == "search":
        search_through_page(page, site.data / "circle" / "circle-0005.png")
        a, b = page.locator("#column-a").bounding_box(), page.locator("#column-b").bounding_box()
        assert b["y"] >= a["y"] + a["height"] - 1  # stacked, not side by side
        first = page.locator("#column-a .result").first
        picked = int(first.get_attribute("data-id") or -1)
        first.locator(".hit").click()
        wait_for_query(page, picked)
        page.click("#gen-go")
        page.locator(".candidate").nth(7).wait_for()
    else:
        page.click(f"#tab-{view}")
        page.locator(".lib-tile img" if view == "library" else "#map-canvas circle").nth(5).wait_for()
        if view == "library":
            page.wait_for_function(TILES_LOADED, arg=".lib-tile img")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    for control in page.locator("button:visible, select:visible, input:visible").all():
        box = control.bounding_box()
        assert box is None or box["x"] >= 0 and box["x"] + box["width"] <= 390  # every control on screen
    save(page, f"browser-{view}-phone.png")
    assert not problems, problems


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


@pytest.fixture(scope="module")
def learnt_url(learnt: tuple[Engine, Path, Path]) -> Iterator[str]:
    """A service over ``learnt``: an AE and a VAE that tell the shapes from noise."""
    with live_server(create_app(learnt[0])) as url:
        yield url


@pytest.mark.sqlite_only  # training is the slow part; the store's side of the percentiles runs in test_ood.py
def test_each_column_shows_how_unusual_the_query_is_and_warns_out_of_distribution(
    learnt: tuple[Engine, Path, Path], learnt_url: str, browser: Any, tmp_path: Path
) -> None:
    """The AE's and the VAE's OOD percentile in their columns; random noise gets the service's warning
    in both, a shape the models never saw gets a percentile and no warning, pixels neither."""
    page, problems = open_page(browser, learnt_url, 1280, 900)
    search_through_page(page, noise_file(tmp_path, 3))
    for slot in ("a", "b"):
        box = page.locator(f"#column-{slot} .ood")
        percentile = float(re.search(r"percentile ([\d.]+)", box.inner_text()).group(1))  # type: ignore[union-attr]
        assert percentile > 99 and "unlike what the model was trained on" in box.locator(".warning").inner_text()
    save(page, "browser-ood-warning.png")

    unseen = sorted(learnt[2].rglob("*.png"))[0]
    search_through_page(page, unseen)
    for slot in ("a", "b"):
        assert "percentile" in page.inner_text(f"#column-{slot} .ood")
        assert page.locator(f"#column-{slot} .warning").count() == 0
    page.select_option("#model-a", "pixels")
    searched(page)
    assert not page.is_visible("#column-a .ood")  # pixels: no percentile
    assert not problems, problems


def test_explain_shows_what_each_model_kept(site: Site, browser: Any) -> None:
    """Explain per column (/api/explain): the query's reconstruction, each hit's, and the VAE's midpoints."""
    page, problems = open_page(browser, site.url, 1280, 900)
    star = httpx.get(site.url + "/api/images", params={"label": "star", "limit": 1}).json()["images"][0]["id"]
    page.goto(f"{site.url}/?q={star}")
    wait_for_query(page, star)
    assert page.is_enabled("#explain-a") and page.is_enabled("#explain-b")
    page.check("#explain-b")  # the VAE: reconstructions and midpoints
    page.locator("#column-b .result .explain figure").nth(2 * K - 1).wait_for()
    assert page.locator("#column-b .explain-query img").evaluate("img => img.complete && img.naturalWidth") == 28
    assert page.locator("#column-b .result .explain figcaption").all_inner_texts()[:2] == ["recon.", "midpoint"]
    page.check("#explain-a")  # the AE: no midpoints
    page.locator("#column-a .result .explain figure").nth(K - 1).wait_for()
    assert page.locator("#column-a .result .explain figure").count() == K
    page.wait_for_function(TILES_LOADED, arg=".explain img, .explain-query img")
    save(page, "browser-explain.png")
    search_through_page(page, site.data / "ring" / "ring-0001.png")  # an upload: POST /api/explain
    page.locator("#column-a .result .explain figure").nth(K - 1).wait_for()
    assert "keeps of the query" in page.inner_text("#column-a .explain-query")
    page.select_option("#model-a", "pixels")  # no decoder: nothing to explain
    assert page.is_disabled("#explain-a") and not page.is_checked("#explain-a")
    assert not problems, problems
