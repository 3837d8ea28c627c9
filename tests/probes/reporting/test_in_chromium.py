"""The audit's report.html and the map's map.html in a real browser (headless Chromium through Playwright):
no script error, no horizontal scroll at 1,280 and 1,920 px on any tab, the suspects table sorts and filters,
the map draws its points and shows a clicked cell. Layout is checked by measured boxes, not pixels.

Needs Chromium (Debian's package ``chromium``; ``EMBEDCACHE_CHROMIUM`` names another executable) and the
``playwright`` package (test extra): skipped with the reason where either is missing, a failure under CI=true.
"""

from __future__ import annotations

import os
import shutil

import pytest

import probes
from tests.conftest import in_ci

WIDTHS = (1280, 1920)
MODEL = "efficientnet-lite0"


def _browser_or_skip() -> str:
    exe = os.environ.get("EMBEDCACHE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if exe is None:
        missing.append("no Chromium (apt-get install chromium, or set EMBEDCACHE_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("no playwright (pip install -e '.[test]')")
    if missing:
        msg = "headless browser checks need " + " and ".join(missing)
        if in_ci():
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    assert exe is not None
    return exe


@pytest.fixture(scope="module")
def browser():
    exe = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(real_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser")
    audit = probes.audit(
        real_store, MODEL, probes="knn", seeds=1, folds=3, top=40, out=out / "audit", cache=False, map_tab=True
    )
    mapped = probes.embedding_map(real_store, MODEL, out=out / "map", thumbnails=80, k=5)
    return audit.files["report.html"], mapped.files["map.html"]


def _open(browser, path, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on(
        "console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors


def _horizontal_overflow(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


@pytest.mark.parametrize("width", WIDTHS)
def test_report_fits_the_window_on_every_tab_with_no_script_error(browser, pages, width):
    report, _ = pages
    page, errors = _open(browser, report, width)
    tabs = page.locator("button.tab")
    names = [tabs.nth(i).inner_text() for i in range(tabs.count())]
    assert names == ["Labels", "Duplicates", "Leaks", "Outliers", "Map"]
    for i, name in enumerate(names):
        tabs.nth(i).click()
        assert _horizontal_overflow(page) <= 0, f"{name} tab scrolls sideways at {width} px"
    tabs.nth(0).click()
    rows = page.locator("#suspects tbody.suspect")
    assert rows.count() == 40
    strip = page.locator("#suspects img.strip").first  # the cell beside its neighbours, inside the window
    box = strip.bounding_box()
    assert box is not None and box["width"] > 100 and box["x"] + box["width"] <= width
    why = page.locator("#suspects td.why").first.bounding_box()
    assert why is not None and why["width"] >= 250  # the reasons are not squeezed into a sliver
    assert errors == []
    page.close()


def test_report_sorts_and_filters_in_the_browser(browser, pages):
    report, _ = pages
    page, errors = _open(browser, report, 1280)
    ranks = "Array.from(document.querySelectorAll('#suspects tbody.suspect')).map(b => +b.rows[0].cells[0].textContent)"
    assert page.evaluate(ranks) == list(range(1, 41))
    page.locator("#suspects th", has_text="score").click()  # descending first: the ranking itself
    page.locator("#suspects th", has_text="score").click()  # ascending: the reverse
    assert page.evaluate(ranks) == list(range(40, 0, -1))
    given = page.locator("#f-given option").nth(1).get_attribute("value")
    page.select_option("#f-given", given)
    shown = page.evaluate(
        "Array.from(document.querySelectorAll('#suspects tbody.suspect')).filter(b => b.style.display !== 'none')"
        ".map(b => b.getAttribute('data-given'))"
    )
    assert shown and set(shown) == {given}
    assert page.locator("#f-count").inner_text().startswith(f"{len(shown)} of 40")
    assert errors == []
    page.close()


PAINTED = (
    "(() => { const c = document.getElementById('map'), d = c.getContext('2d')"
    ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
    " for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })()"
)


@pytest.mark.parametrize("width", WIDTHS)
def test_map_draws_every_point_with_no_script_error(browser, pages, width):
    _, mapped = pages
    page, errors = _open(browser, mapped, width)
    assert _horizontal_overflow(page) <= 0
    assert page.locator("#legend span").count() == 13  # one entry per class
    assert page.evaluate(PAINTED) > 1000  # the points are on the canvas
    assert errors == []
    page.close()


def test_the_reports_map_tab_shows_the_map_coloured_by_suspicion(browser, pages):
    report, _ = pages
    page, errors = _open(browser, report, 1280)
    page.locator("button.tab", has_text="Map").click()
    frame = page.frame_locator("iframe.map")
    options = frame.locator("#colour option").all_inner_texts()
    assert "suspicion" in options and "label" in options
    inner = next(f for f in page.frames if f != page.main_frame)
    assert inner.evaluate(PAINTED) > 1000 and _horizontal_overflow(page) <= 0
    assert errors == []
    page.close()
