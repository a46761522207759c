"""The gallery pages in a real browser (headless Chromium, Selenium): a run page of 12 images and a 2x2 sweep page
opened from disk. Marked `browser`: `.ci/browser` installs Chromium and runs them as their own stage; the default
run leaves them out, and they skip, naming what is missing, where no browser is installed."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import artifacts, chromium
from engine_helpers import pixels
from test_gallery import run_command

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>alert(1)</script> a cat"
PROMPTS = ["a red cube", "a blue sphere", HOSTILE]
ALL_LOADED = "return [...document.querySelectorAll(arguments[0])].every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture(scope="module")
def pages(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A run of 12 images (three prompts, one of them hostile) and a 2x2 sweep (seed x CFG scale)."""
    base = tmp_path_factory.mktemp("gallery")
    run, sweep = base / "run", base / "sweep"
    quoted = ",".join('"' + p + '"' for p in PROMPTS)
    common = ["model=tiny", "sampler.steps=4", "perf.progress=false"]
    proc = run_command([sys.executable, str(ROOT / "run.py"), *common, "width=64", "height=64", f"prompt=[{quoted}]",
                        "images_per_prompt=4", "seed=100", f"hydra.run.dir={run}"], cache_dir, base)
    assert proc.returncode == 0, proc.stderr
    # 128 px: the sweep page's screenshot is the README's picture
    proc = run_command([sys.executable, str(ROOT / "run.py"), "-m", *common, "width=128", "height=128",
                        "prompt=a lighthouse at dusk", "seed=1,2", "sampler.cfg_scale=3,9",
                        f"hydra.sweep.dir={sweep}"], cache_dir, base)
    assert proc.returncode == 0, proc.stderr
    return {"run": run, "sweep": sweep, "base": base}


@pytest.fixture()
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.documentElement.dataset.ready"))


def wait_images(driver, selector: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # lazy images load when near
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(ALL_LOADED, selector))
    driver.execute_script("window.scrollTo(0, 0)")


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def no_dialog(driver) -> bool:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, 1).until(expected_conditions.alert_is_present())
    except TimeoutException:
        return True
    return False


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def visible_seeds(driver) -> list[str]:
    return [e.text for e in css(driver, ".card:not([hidden]) .seed")]


# ---------------------------------------------------------------- the run page


def test_run_page_thumbnails_filter_and_detail(browser, pages) -> None:
    open_page(browser, pages["run"] / "index.html")
    wait_images(browser, "#cards img")
    assert len(css(browser, "#cards img")) == 12 and css(browser, "#count")[0].text == "12 images"
    browser.save_screenshot(str(artifacts() / "run-page.png"))
    search = css(browser, "#filter")[0]
    search.send_keys("sphere")
    assert visible_seeds(browser) == ["seed 104", "seed 105", "seed 106", "seed 107"]
    assert all("sphere" in e.text for e in css(browser, ".card:not([hidden]) .prompt"))
    assert css(browser, "#count")[0].text == "4 of 12 images"
    search.send_keys("\b" * len("sphere"))  # typed away: clear() would send no input event
    assert len(visible_seeds(browser)) == 12
    css(browser, "#sort")[0].send_keys("Seed")
    css(browser, "#sort-dir")[0].click()
    assert visible_seeds(browser)[0] == "seed 111"  # sorted by seed, descending
    css(browser, ".card:not([hidden]) .thumb")[2].click()
    assert css(browser, "#detail .detail-seed")[0].text == "seed 109"
    wait_images(browser, "#detail img.full")
    browser.save_screenshot(str(artifacts() / "run-detail.png"))
    from selenium.webdriver.common.keys import Keys

    css(browser, "body")[0].send_keys(Keys.ARROW_RIGHT)
    assert css(browser, "#detail .detail-seed")[0].text == "seed 108"  # the next in the visible order
    css(browser, "body")[0].send_keys(Keys.ESCAPE)
    assert not css(browser, "#detail")[0].is_displayed()
    assert console_errors(browser) == []


def test_copied_command_makes_the_same_image(browser, pages, cache_dir) -> None:
    open_page(browser, pages["run"] / "index.html")
    css(browser, ".card .thumb")[5].click()
    assert css(browser, "#detail .detail-seed")[0].text == "seed 105"
    css(browser, "#copy-infotext")[0].click()
    infotext = browser.execute_script("return window.__copied")
    assert infotext.startswith("a blue sphere\nSteps: 4, Sampler: DDIM") and "Seed: 105" in infotext
    css(browser, "#copy-command")[0].click()
    line = browser.execute_script("return window.__copied")
    assert css(browser, "#copy-command")[0].text == "Copied" and line.startswith("sdbatch ")
    if shutil.which("sdbatch", path=str(Path(sys.executable).parent)) is None:  # not installed: the same app
        line = line.replace("sdbatch", f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'run.py'))}", 1)
    again = pages["base"] / "again"
    proc = run_command(["bash", "-c", f"{line} hydra.run.dir={again}"], cache_dir, pages["base"])
    assert proc.returncode == 0, proc.stderr
    (made,) = sorted(again.glob("*.png"))
    assert np.array_equal(pixels(made), pixels(pages["run"] / "00005-105.png"))
    assert console_errors(browser) == []


def test_a_script_in_a_prompt_is_text(browser, pages) -> None:
    open_page(browser, pages["run"] / "index.html")
    assert no_dialog(browser)
    hostile = [e for e in css(browser, ".card .prompt") if e.text == HOSTILE]
    assert len(hostile) == 4  # shown as the text it is, on each of its images
    css(browser, ".card .thumb")[8].click()
    assert css(browser, "#detail .prompt-text")[0].text == HOSTILE
    assert browser.execute_script("return document.querySelectorAll('script').length") == 2
    assert no_dialog(browser) and console_errors(browser) == []


# ---------------------------------------------------------------- the sweep page


def _header(driver) -> list[str]:
    return [e.text for e in css(driver, "table.xy tr:first-child th") if e.text]


def _cell_files(driver) -> list[str]:
    return [e.get_attribute("src").rsplit("/", 2)[-2] for e in css(driver, "table.xy td img")]  # job folders


def test_sweep_page_axes_compare_and_failures(browser, pages) -> None:
    open_page(browser, pages["sweep"] / "index.html")
    wait_images(browser, "table.xy td img")
    assert _header(browser) == ["sampler.cfg_scale: 3", "sampler.cfg_scale: 9"]  # as the contact sheet
    assert _cell_files(browser) == ["0", "1", "2", "3"]  # jobs: seed 1 cfg 3, seed 1 cfg 9, seed 2 ...
    browser.save_screenshot(str(artifacts() / "sweep-page.png"))
    from selenium.webdriver.support.ui import Select

    Select(css(browser, "#axis-x")[0]).select_by_value("seed")
    assert _header(browser) == ["seed: 1", "seed: 2"]
    assert _cell_files(browser) == ["0", "2", "1", "3"]  # the grid turned: seeds across, CFG down
    Select(css(browser, "#axis-y")[0]).select_by_value("")
    fixed = Select(css(browser, "select[data-dim='sampler.cfg_scale']")[0])
    fixed.select_by_value("9")
    assert _cell_files(browser) == ["1", "3"]  # one row: CFG fixed at 9
    css(browser, "button[data-view=images]")[0].click()
    boxes = css(browser, ".card .pick input")
    boxes[0].click()
    boxes[3].click()
    css(browser, "#compare")[0].click()
    wait_images(browser, "#compare-view img")
    assert len(css(browser, "#compare-view .compare-images img")) == 2
    differing = {e.get_attribute("data-key") for e in css(browser, "#compare-view tr.diff")}
    assert {"seed", "cfg_scale", "file"} <= differing and "steps" not in differing
    browser.save_screenshot(str(artifacts() / "sweep-compare.png"))
    assert console_errors(browser) == []


def test_failed_jobs_show_their_error(browser, pages, cache_dir) -> None:
    sweep = pages["base"] / "failing"
    proc = run_command([sys.executable, str(ROOT / "run.py"), "-m", "model=tiny", "prompt=a cat", "height=64",
                        "sampler.steps=2", "perf.progress=false", "width=64,100", f"hydra.sweep.dir={sweep}"],
                        cache_dir, pages["base"])
    assert proc.returncode == 2
    open_page(browser, sweep / "index.html")
    cells = css(browser, "table.xy td")
    assert len(cells) == 2 and "width must be a multiple of 8" in cells[1].text
    assert css(browser, "table.xy td img")  # the job that worked shows its image
    assert console_errors(browser) == []


def test_dark_theme_follows_the_system(pages) -> None:
    driver = chromium(dark=True)
    try:
        open_page(driver, pages["sweep"] / "index.html")
        background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 23, 26)"
        driver.save_screenshot(str(artifacts() / "sweep-page-dark.png"))
    finally:
        driver.quit()


def test_without_javascript_the_page_is_a_readable_list(pages) -> None:
    driver = chromium()
    try:
        driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
        driver.get((pages["run"] / "index.html").as_uri())
        items = css(driver, "ol.static li")
        assert len(items) == 12 and "seed 100 · a red cube" in items[0].text
        assert items[0].find_element("css selector", "a").get_attribute("href").endswith("/00000-100.png")
    finally:
        driver.quit()


def test_fused_grid_run_page_has_the_xy_view(browser, pages, cache_dir) -> None:
    run = pages["base"] / "fused"
    proc = run_command([sys.executable, str(ROOT / "run.py"), "model=tiny", "prompt=a cat", "width=64", "height=64",
                        "sampler.steps=2", "perf.progress=false", "grid.x.key=sampler.cfg_scale", "grid.x.values=[3,9]",
                        "grid.y.key=seed", "grid.y.values=[1,2]", f"hydra.run.dir={run}"], cache_dir, pages["base"])
    assert proc.returncode == 0, proc.stderr
    open_page(browser, run / "index.html")
    css(browser, "button[data-view=grid]")[0].click()
    wait_images(browser, "table.xy td img")
    assert _header(browser) == ["sampler.cfg_scale: 3", "sampler.cfg_scale: 9"]
    rows = [e.text for e in css(browser, "table.xy th.row")]
    assert rows == ["seed: 1", "seed: 2"]
    files = [e.get_attribute("src").rsplit("/", 1)[-1] for e in css(browser, "table.xy td img")]
    assert files == ["00000-1.png", "00001-1.png", "00002-2.png", "00003-2.png"]  # x fastest, as planned
    css(browser, "table.xy td button")[3].click()
    assert css(browser, "#detail .detail-seed")[0].text == "seed 2"
    assert "sampler.cfg_scale=9" in css(browser, "#detail .command")[0].text
    assert console_errors(browser) == []


def test_live_page_reloads_until_the_run_ends(browser, tmp_path) -> None:
    from test_outputs import make_params, small_image

    from sdbatch.outputs.gallery import RunGallery
    from sdbatch.outputs.run_dir import RunDir

    gallery = RunGallery(tmp_path, interval=0)
    out = RunDir(tmp_path, on_save=gallery.saved)
    out.save(small_image(), make_params(0))
    open_page(browser, tmp_path / "index.html")
    assert css(browser, ".toolbar .live")[0].text == "running"
    out.save(small_image(80), make_params(1))
    gallery.finish()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda d: css(d, "#count") and css(d, "#count")[0].text == "2 images")
    assert not css(browser, ".toolbar .live")  # the finished page stops reloading
    assert console_errors(browser) == []


def test_a_killed_runs_page_stops_reloading(browser, tmp_path) -> None:
    from test_outputs import make_params, small_image

    from sdbatch.outputs.gallery_data import run_page_data
    from sdbatch.outputs.gallery_page import write_page
    from sdbatch.outputs.run_dir import RunDir

    RunDir(tmp_path).save(small_image(), make_params(0))
    data = {**run_page_data(tmp_path, live=True), "generated": "2020-01-01T00:00:00+00:00"}  # never finished
    write_page(tmp_path, data)
    open_page(browser, tmp_path / "index.html")
    assert "no update since" in css(browser, ".toolbar .stale")[0].text and not css(browser, ".toolbar .live")
    browser.execute_script("window.__stillHere = true")
    import time

    time.sleep(4)  # longer than the reload interval
    assert browser.execute_script("return window.__stillHere") is True
    assert console_errors(browser) == []
