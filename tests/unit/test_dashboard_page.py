"""The live dashboard's page (serving/dashboard.html) in headless Chromium, against a
stdlib HTTP server that fakes the monitor's growing history: charts fill, counters move,
the arms table names every arm, a failing history endpoint shows "connection lost" and
the page recovers, and missing sections render as "–" without a script error."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium_driver, read_numbers, save_screenshot

PAGE = Path(__file__).resolve().parents[2] / "serving" / "dashboard.html"
CHARTS = [
    "chart-swt",
    "chart-vtr",
    "chart-serving",
    "chart-ingest",
    "chart-freshness",
    "chart-training",
]
ARMS = {
    "control": ("frozen", "v0007"),
    "online": ("online", "v0012"),
    "ipa": ("online-ipa", "v0010"),
}
METRICS = {"requests", "sessions", "records", "lag", "pairs", "rounds", "p99_ms"}


def snapshot(i: int, t: float, sparse: bool = False) -> dict:
    """The ``i``-th snapshot of a loop whose counters all grow with ``i``."""
    if sparse:  # no DPO sampler, no training, no serving stats, one section failed
        return {
            "t": t,
            "arms": {"control": {"share": 1.0, "learning": "frozen", "version": None}},
            "online": {
                "control": {"sessions": 3 + i, "swt": None, "vtr": None, "ltr": None, "wtr": None}
            },
            "ingest": {
                "lag": None,
                "records": 10 * i,
                "records_per_s": None,
                "freshness_p50_ms": None,
                "freshness_p99_ms": None,
                "dead_lettered": 0,
                "lake_sessions": 0,
            },
            "training": {},
            "dpo": None,
            "errors": {"serving": "ConnectionError: no route"},
        }
    arms, online, training = {}, {}, {}
    for k, (arm, (learning, version)) in enumerate(ARMS.items()):
        arms[arm] = {"share": 1 / 3, "learning": learning, "version": version}
        sessions = 40 * (i + 1) + 7 * k
        online[arm] = {
            "sessions": sessions,
            "swt": 41.0 + k,
            "vtr": 0.30 + 0.02 * k,
            "ltr": 0.05,
            "wtr": 0.01,
            "recent": {
                "window_s": 60.0,
                "sessions": 12 + i % 5,
                "swt": 40.0 + k + (i % 7),
                "vtr": 0.28 + 0.03 * k + 0.01 * (i % 4),
                "ltr": 0.04 + 0.005 * k,
                "wtr": 0.01,
            },
        }
        if learning != "frozen":
            training[arm] = {
                "round": i // 2,
                "status": "promoted" if i % 2 else "training",
                "version": version,
                "rounds": i // 2,
                "promoted": i // 3,
                "rejected": i // 6,
                "ntp_loss": 3.2 - 0.01 * i,
                "dpo_loss": 0.69 - 0.002 * i,
                "reward_auc": 0.6,
                "feedback_age_s": 5.0 + (i % 9),
                "feedback_to_serving_s": 20.0,
                "running": True,
            }
    return {
        "t": t,
        "arms": arms,
        "online": online,
        "ingest": {
            "lag": 100 + 13 * (i % 11),
            "records": 500 * (i + 1),
            "records_per_s": 250.0,
            "freshness_p50_ms": 800.0,
            "freshness_p99_ms": 2500.0 + 100 * (i % 5),
            "dead_lettered": 0,
            "lake_sessions": 30 * i,
        },
        "training": training,
        "dpo": {
            "offered": 20 * i,
            "processed": 18 * i,
            "emitted": 9 * i,
            "dropped": 0,
            "queue": 2,
            "cpu_s_per_request": 0.004,
        },
        "serving": {
            "requests": 120 * (i + 1),
            "errors": 0,
            "requests_per_s": 60.0 + (i % 6),
            "latency_ms": {"p50": 18.0 + (i % 3), "p90": 30.0, "p99": 45.0 + (i % 8), "n": 200},
        },
        "errors": {},
    }


class FakeMonitor:
    """A history that gains one snapshot per request; ``failing`` makes it answer 500."""

    def __init__(self, sparse: bool = False, initial: int = 5) -> None:
        self.sparse = sparse
        self.failing = False
        self.lock = threading.Lock()
        now = time.time()
        self.snapshots = [snapshot(i, now - 2.0 * (initial - i), sparse) for i in range(initial)]

    def history(self, since: float | None) -> dict:
        with self.lock:
            t = max(time.time(), self.snapshots[-1]["t"] + 0.001)
            self.snapshots.append(snapshot(len(self.snapshots), t, self.sparse))
            return {
                "snapshots": [s for s in self.snapshots if since is None or s["t"] > since],
                "interval_s": 2.0,
            }


def serve(monitor: FakeMonitor) -> ThreadingHTTPServer:
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
            url = urlparse(self.path)
            if url.path in ("/dashboard", "/dashboard/"):
                return self.reply(200, "text/html; charset=utf-8", page)
            if url.path == "/dashboard/api/history":
                if monitor.failing:
                    return self.reply(500, "application/json", b'{"detail": "monitor down"}')
                since = parse_qs(url.query).get("since")
                body = monitor.history(float(since[0]) if since else None)
                return self.reply(200, "application/json", json.dumps(body).encode())
            self.reply(404, "text/plain", b"not found")

        def reply(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fake-dashboard", daemon=True).start()
    return server


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    drv = chromium_driver()
    try:
        yield drv
    finally:
        drv.quit()


def open_dashboard(
    driver: WebDriver, monitor: FakeMonitor, path: str = "/dashboard"
) -> ThreadingHTTPServer:
    server = serve(monitor)
    driver.get_log("browser")  # drop what earlier tests logged
    driver.get(f"http://127.0.0.1:{server.server_address[1]}{path}")
    return server


def chart_points(driver: WebDriver) -> dict[str, int]:
    return {c: int(driver.find_element(By.ID, c).get_attribute("data-points") or 0) for c in CHARTS}


def script_errors(driver: WebDriver) -> list[str]:
    # Failed fetches log "Failed to load resource" at SEVERE too: those are expected here.
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def test_dashboard_fills_charts_and_updates_numbers(driver: WebDriver) -> None:
    monitor = FakeMonitor()
    server = open_dashboard(driver, monitor, "/dashboard/")  # trailing slash: same API base
    try:
        WebDriverWait(driver, 20, poll_frequency=0.2).until(
            lambda d: all(n > 1 for n in chart_points(d).values())
        )
        for chart in CHARTS:  # every chart drew at least one line with two points or more
            paths = driver.find_elements(By.CSS_SELECTOR, f"#{chart} svg path")
            assert any(p.get_attribute("d").count("L") >= 1 for p in paths), chart
        before = read_numbers(driver)
        assert set(before) == METRICS
        assert all(v and v != "–" for v in before.values()), before

        WebDriverWait(driver, 15, poll_frequency=0.2).until(lambda d: read_numbers(d) != before)
        after = read_numbers(driver)
        assert after != before
        assert int(after["requests"].replace(",", "")) > int(before["requests"].replace(",", ""))

        table = driver.find_element(By.ID, "arms").text
        for arm, (learning, version) in ARMS.items():
            assert arm in table and version in table and learning in table, (arm, table)
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("last update ") and " snapshots" in status
        assert not driver.find_element(By.ID, "conn").is_displayed()

        shot = save_screenshot(driver, "dashboard-unit.png")
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (shot, len(data))
        assert script_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_shows_connection_lost_and_recovers(driver: WebDriver) -> None:
    monitor = FakeMonitor()
    server = open_dashboard(driver, monitor)
    conn = lambda d: d.find_element(By.ID, "conn")  # noqa: E731
    count = lambda d: int(d.find_element(By.ID, "status").text.split(", ")[1].split()[0])  # noqa: E731
    try:
        WebDriverWait(driver, 10, poll_frequency=0.2).until(
            lambda d: d.find_element(By.ID, "status").text.startswith("last update")
        )
        monitor.failing = True
        WebDriverWait(driver, 10, poll_frequency=0.2).until(lambda d: conn(d).is_displayed())
        assert "connection lost" in conn(driver).text
        seen = count(driver)
        monitor.failing = False
        WebDriverWait(driver, 10, poll_frequency=0.2).until(
            lambda d: not conn(d).is_displayed() and count(d) > seen
        )
        assert script_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_renders_missing_sections_as_dashes(driver: WebDriver) -> None:
    monitor = FakeMonitor(sparse=True)
    server = open_dashboard(driver, monitor)
    try:
        WebDriverWait(driver, 10, poll_frequency=0.2).until(
            lambda d: d.find_element(By.ID, "status").text.startswith("last update")
        )
        numbers = read_numbers(driver)
        for metric in ("requests", "lag", "pairs", "rounds", "p99_ms"):
            assert numbers[metric] == "–", (metric, numbers)
        assert numbers["sessions"] not in ("", "–") and numbers["records"] not in ("", "–")
        assert "control" in driver.find_element(By.ID, "arms").text
        assert "serving" in driver.find_element(By.ID, "errors").text
        assert chart_points(driver)["chart-training"] == 0
        assert script_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()
