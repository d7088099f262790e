"""The race page in a real browser against the embedded model: headless Chromium (Debian's `chromium`, driven by
Playwright) asks one question on `sot serve --backend local` and watches both panes answer it.

It checks that both panes finish, that SoT's pane showed several points growing at the same time before it
finished, and that the page raised no errors; it saves screenshots (mid-race and finished) under artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sot.testing.process import ServiceProcess, serve_command

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
QUESTION = "What are some tips for staying healthy?"

# Installed before the page's own script: records, at every change of SoT's pane, how many points were
# growing at once (running, with text) and which ones grew before the pane finished.
WATCH_POINTS = """
window.__race = { maxGrowing: 0, grew: [], finishedAt: null };
document.addEventListener("DOMContentLoaded", () => {
  const pane = document.querySelector("#pane-sot");
  new MutationObserver(() => {
    if (pane.dataset.state === "done" && window.__race.finishedAt === null) window.__race.finishedAt = Date.now();
    if (window.__race.finishedAt !== null) return;
    const growing = [...pane.querySelectorAll('.point[data-state="running"]')]
      .filter((p) => p.querySelector(".point-text").textContent.trim().length > 0);
    window.__race.maxGrowing = Math.max(window.__race.maxGrowing, growing.length);
    for (const p of growing) {
      if (!window.__race.grew.includes(p.dataset.index)) window.__race.grew.push(p.dataset.index);
    }
  }).observe(pane, { subtree: true, childList: true, characterData: true, attributes: true });
});
"""


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    # The first load may re-encode the packaged weights into ~/.cache/sot: allow for it.
    with ServiceProcess(serve_command(backend="local"), name="serve-local", startup_timeout=900) as process:
        yield process.root_url


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_the_race_page_shows_both_answers_and_points_growing_in_parallel(local_server: str) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.add_init_script(WATCH_POINTS)
            page.goto(local_server + "/")
            page.wait_for_function("document.querySelector('#server-backend b')?.textContent === 'local'")

            page.fill("#question", QUESTION)
            page.click("#go")
            page.wait_for_function("window.__race.maxGrowing >= 3", timeout=300_000)
            page.screenshot(path=str(ARTIFACTS / "browser-race-live.png"), full_page=True)

            page.wait_for_selector("#verdict:not([hidden])", timeout=600_000)
            page.screenshot(path=str(ARTIFACTS / "browser-race.png"), full_page=True)
            race: dict[str, Any] = page.evaluate("window.__race")
            states = page.evaluate(
                "[...document.querySelectorAll('.pane')].map((p) => [p.dataset.mode, p.dataset.state])"
            )
            normal_text = page.inner_text("#pane-normal [data-role=answer]")
            points = page.eval_on_selector_all(
                "#pane-sot .point",
                "(ps) => ps.map((p) => [p.dataset.state, p.querySelector('.point-text').textContent])",
            )
            speedup = float(page.get_attribute("#verdict", "data-speedup") or "nan")
        finally:
            browser.close()

    assert states == [["normal", "done"], ["sot", "done"]], problems
    assert normal_text.strip()
    assert len(points) >= 3 and all(state in ("done", "truncated") and text.strip() for state, text in points)
    # The point of SoT, seen on the page: several points were filling in at the same time.
    assert race["maxGrowing"] >= 3 and len(race["grew"]) >= 3, race
    assert speedup > 0
    assert not problems, problems
