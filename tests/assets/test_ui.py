"""The Dagster UI in a real browser (Debian's Chromium, driven by Playwright): corpus text in asset metadata is
shown as text; its images, links, HTML and scripts never load or run.

Everything binds 127.0.0.1: the webserver, and a beacon server that the hostile document's image URLs point at,
which counts every request a browser makes to it. The test stops exactly the processes it started.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, prose, write_jsonl

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,  # dagster dev and Chromium
    # CI installs it (.ci/run), so there a missing browser fails the test instead of skipping it
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                       reason="Chromium is not installed (apt-get install chromium)"),
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Beacon(http.server.ThreadingHTTPServer):
    """Records the path of every request; answers 404."""

    def __init__(self):
        self.paths: list[str] = []
        beacon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                beacon.paths.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def beacon():
    server = Beacon()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def dagster_env(tmp_path: Path) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return {
        **os.environ, "DAGSTER_HOME": str(home), "FRUGAL_DATA_DIR": str(tmp_path / "data"),
        "FRUGAL_WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the webserver exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_document_markup_in_metadata_loads_nothing_in_the_browser(tmp_path, beacon):
    from playwright.sync_api import sync_playwright

    hostile = (
        f"![PyPI version]({beacon.url}/markdown-image.svg) <img src='{beacon.url}/html-image.png'> "
        f"<script>fetch('{beacon.url}/script')</script> [docs]({beacon.url}/link) **bold**"
    )
    rows = [
        {"id": "hostile", "text": hostile + " " + prose(1, 20)},
        *({"id": f"d{i}", "text": prose(i)} for i in range(4)),
    ]
    src = write_jsonl(tmp_path / "crawl.jsonl", rows)
    env = dagster_env(tmp_path)
    run_config = {"ops": {"raw_documents": {"config": {"inputs": [str(src)]}}}}
    subprocess.run([str(BIN / "python"), "-m", "assets.drops", "add", "crawl"], cwd=ROOT, env=env, check=True)
    materialize = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions", "--select", "raw_documents",
         "--partition", "crawl", "--config-json", json.dumps(run_config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert materialize.returncode == 0, materialize.stderr[-3000:]

    port = free_port()
    web = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info", web)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://127.0.0.1:{port}/assets/raw_documents", wait_until="networkidle")
            page.get_by_text("preview", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let any image or script the page would load do so
            page.screenshot(path=str(tmp_path / "raw_documents.png"), full_page=True)
            shown = page.get_by_text(f"![PyPI version]({beacon.url}/markdown-image.svg)", exact=False).count()
            beacon_images = page.eval_on_selector_all(
                "img", f"els => els.filter(e => e.src.startsWith('{beacon.url}'))"
            )
            browser.close()
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
    assert beacon.paths == [], f"the browser fetched {beacon.paths} from a document's markup"
    assert beacon_images == [] and dialogs == []
    assert shown >= 1, "the preview shows the document's markup as literal text"


def test_the_ui_lists_the_graph_launches_a_drop_and_shows_its_plots(tmp_path, monkeypatch):
    """`dagster dev` (webserver and daemon) on 127.0.0.1: the asset catalog lists every asset of the project;
    raw_documents launched from its page materializes the chosen drop; the automation carries the drop through
    near_dedup_documents, whose page then shows its cluster-size plot."""
    from playwright.sync_api import sync_playwright

    from assets.definitions import defs

    env = dagster_env(tmp_path)
    env["FRUGAL_DROPS_URL"] = str(tmp_path / "drops")
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])  # this process reads the instance's event log too
    (tmp_path / "drops").mkdir()
    rows = [{"id": f"d{i}", "text": prose(i, 120)} for i in range(20)]
    rows += [{"id": "d3-copy", "text": prose(3, 120) + " read more"}]  # a near-duplicate: a cluster of two
    write_jsonl(tmp_path / "drops" / "crawl-1.jsonl", rows)
    # the drop is known before the daemon starts, so its sensor leaves it to the UI
    subprocess.run([str(BIN / "python"), "-m", "assets.drops", "add", "crawl-1.jsonl"], cwd=ROOT, env=env, check=True)
    port = free_port()
    log = open(tmp_path / "dagster-dev.log", "w")  # noqa: SIM115 (closed after the process ends)
    dev = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-m", "assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info", dev, timeout=180)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/assets", wait_until="networkidle")
            page.get_by_text("raw_documents", exact=True).first.wait_for(timeout=90_000)
            skip = page.get_by_role("button", name="Skip", exact=True)  # the first visit's newsletter dialog
            if skip.count():
                skip.first.click()
            page.screenshot(path=str(shots / "catalog.png"), full_page=True)
            keys = [k.to_user_string() for k in defs.resolve_all_asset_keys()]
            listed = [k for k in keys if page.get_by_text(k, exact=True).count()]
            assert sorted(listed) == sorted(keys) and len(keys) >= 16

            page.goto(f"http://127.0.0.1:{port}/assets/raw_documents", wait_until="networkidle")
            page.get_by_text("raw_documents").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "raw_documents.png"), full_page=True)
            page.locator("button:has-text('Materialize')").first.click()  # "Materialize…": a dialog
            page.get_by_text("Partition selection").first.wait_for(timeout=30_000)
            page.get_by_role("dialog").get_by_text("All", exact=True).first.click()  # every drop: this test's one
            launch = page.locator("button:has-text('Launch 1 run')")
            launch.first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "launch_dialog.png"), full_page=True)
            launch.first.click()
            wait_materialized(env, "raw_documents", "crawl-1.jsonl", dev, timeout=240)
            # no one launches the next stages: the automation condition sensor does
            wait_materialized(env, "near_dedup_documents", "crawl-1.jsonl", dev, timeout=300)

            page.goto(f"http://127.0.0.1:{port}/assets/near_dedup_documents?partition=crawl-1.jsonl",
                      wait_until="networkidle")  # fmt: skip
            page.get_by_text("cluster_sizes", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "near_dedup_documents.png"), full_page=True)
            data_pngs = "els => els.filter(e => e.src.startsWith('data:image/png')).map(e => e.naturalWidth)"
            inline = page.eval_on_selector_all("img", data_pngs)  # the thumbnail, on the page itself
            # the full plot, with its axes, one click away: the UI puts long Markdown behind a dialog
            page.locator("tr:has-text('cluster_size_histogram')").get_by_text("[Show Markdown]").first.click()
            page.get_by_role("dialog").locator("img").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "cluster_size_histogram.png"))
            full = page.get_by_role("dialog").locator("img").evaluate_all(data_pngs)
            browser.close()
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:  # its daemon was still running the automation's runs: stop the group
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(timeout=30)
        log.close()
    assert inline and all(w >= 90 for w in inline), "the asset page shows its thumbnail plot, not only behind a dialog"
    assert full and full[0] >= 400
    assert (tmp_path / "data" / "near_dedup_documents" / "partitions" / "crawl-1.jsonl" / "clusters.parquet").exists()


def wait_materialized(env: dict, asset: str, partition: str, proc: subprocess.Popen, timeout: float) -> None:
    import dagster as dg

    deadline = time.monotonic() + timeout
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"dagster dev exited with {proc.returncode}"
            if partition in instance.get_materialized_partitions(dg.AssetKey(asset)):
                return
            time.sleep(1)
    raise AssertionError(f"{asset} [{partition}] was not materialized within {timeout} s")
