"""The status page in a real browser, on a real cluster: three `quorum node` processes from
nodes/*.toml (on free ports), the page open in headless Chromium; one node is killed with -9
and the page shows it dead without a reload. Also `quorum status --once` against the same
kind of cluster, as an operator would run it.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (`.ci/run`
installs them); skipped with that reason otherwise. Set QUORUM_STATUS_SCREENSHOT=path to also
save the screenshot there (docs/status-page.png is made this way).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.processes import NodeProcess, start_node_processes, stop_node_processes

pytestmark = pytest.mark.slow

NAMES = ("node-a", "node-b", "node-c")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    nodes = start_node_processes(tmp_path)
    try:
        yield nodes
    finally:
        stop_node_processes(nodes)


def test_status_once_on_a_real_cluster_prints_every_node_in_full(
    processes: list[NodeProcess],
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quorum", "status", "--once", processes[0].url],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for node in processes:
        assert re.search(rf"{re.escape(node.url)}(?!\d)", out), node.url
        assert re.search(rf"{node.name}\s+alive", out)
        for model in node.models:
            assert model in out


def browser() -> Any:
    """Headless Chromium through chromedriver (Debian's packages), or a skip saying what is
    missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if chromium is None or driver_path is None:
        pytest.skip(
            "needs a browser: Debian's chromium and chromium-driver packages and the selenium "
            "Python package (.ci/run installs them: apt-get install chromium chromium-driver; "
            "pip install selenium)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def traffic(url: str, models: list[str], stop: threading.Event) -> None:
    """Streams through ``url``, a few per second, each model in turn, until ``stop`` (at most
    600): local ones, forwarded ones, and after the kill, ones that fail over or fail."""
    with httpx.Client(timeout=10) as http:
        for i in range(600):
            if stop.wait(0.1):
                return
            body = {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "stream": True,
                "max_tokens": 40,
            }
            try:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    for _ in response.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass


def test_page_shows_a_killed_node_dead_without_a_reload(
    processes: list[NodeProcess], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    stop = threading.Event()
    models = sorted({m for node in processes for m in node.models})
    load = threading.Thread(target=traffic, args=(processes[0].url, models, stop), daemon=True)
    try:
        entry, victim = processes[0], processes[2]
        driver.get(entry.url + "/")

        def states() -> dict[str, str]:
            # read in one script: the page replaces the rows on every members event
            return driver.execute_script(  # type: ignore[no-any-return]
                "return Object.fromEntries([...document.querySelectorAll("
                "'#members tr[data-member]')].map(r => [r.dataset.member, r.dataset.state]));"
            )

        WebDriverWait(driver, 20, poll_frequency=0.1).until(
            lambda _: states() == dict.fromkeys(NAMES, "alive")
        )
        assert "live" in driver.find_element(By.ID, "conn").text
        driver.execute_script("window.quorumNotReloaded = true;")
        load.start()
        time.sleep(4)  # a few seconds of traffic on the charts

        os.kill(victim.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        gossip_dead = page_dead = None
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() - killed < 40 and page_dead is None:
                if gossip_dead is None:
                    view = http.get(entry.url + "/cluster/members").json()["members"]
                    if any(m["name"] == victim.name and m["state"] == "dead" for m in view):
                        gossip_dead = time.monotonic() - killed
                if states().get(victim.name) == "dead":
                    page_dead = time.monotonic() - killed
                time.sleep(0.1)
        assert page_dead is not None, f"the page never showed {victim.name} dead: {states()}"
        assert driver.execute_script("return window.quorumNotReloaded === true;")
        assert states() == {"node-a": "alive", "node-b": "alive", "node-c": "dead"}
        # within the gossip detection time: no later than node-a's own view, give or take
        # the feed's member interval and this loop's polling
        assert gossip_dead is None or page_dead <= gossip_dead + 2.0, (gossip_dead, page_dead)
        log = driver.find_element(By.ID, "log").text
        assert re.search(r"node-c: (alive|suspect) → dead", log), log
        assert (
            driver.execute_script(
                "return document.querySelector('#members tr[data-member=\"node-c\"]').className;"
            )
            == "dead"
        )
        time.sleep(2)  # failovers and the dead member on the charts
        stop.set()
        load.join(timeout=15)
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-rps path.series")
        shot = tmp_path / "status-page.png"
        height, frame = driver.execute_script(
            "return [document.documentElement.scrollHeight,"
            " window.outerHeight - window.innerHeight];"
        )
        driver.set_window_size(1280, height + frame)  # the whole page
        assert driver.save_screenshot(str(shot))
        if target := os.environ.get("QUORUM_STATUS_SCREENSHOT"):
            shutil.copy(shot, target)
        problems = [
            e["message"]
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]
        ]
        assert not problems, problems
        print(f"node-c dead: node-a's view after {gossip_dead} s, the page after {page_dead} s")
    finally:
        stop.set()
        if load.is_alive():
            load.join(timeout=15)
        driver.quit()
