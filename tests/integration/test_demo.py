"""``recloop demo --quick`` on its own real stack (Kafka, Ray + Serve, Feast), with the live
dashboard looked at in headless Chromium while the loop runs.

The demo runs as a subprocess (as a user runs it). While its simulated traffic flows the
test opens the dashboard twice in the browser and checks that its charts show data and
that its numbers moved between the two looks, keeps a screenshot
(``tests/artifacts/dashboard-live.png``, or ``$RECLOOP_TEST_ARTIFACTS``), and scrapes the
Prometheus endpoint. When the demo ends, its JSON summary must have data in every
section and the report every figure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from recloop.config import PROJECT_ROOT
from tests.conftest import short_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHARTS = ("chart-swt", "chart-vtr", "chart-serving", "chart-ingest", "chart-training")


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(1.0)
    pytest.fail(f"no line matching {pattern!r} after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _serving_requests(url: str) -> int:
    try:
        snap = requests.get(url + "/api/snapshot", timeout=10).json()
    except (requests.RequestException, ValueError):
        return 0
    return int(((snap or {}).get("serving") or {}).get("requests") or 0)


def test_quick_demo_runs_the_loop_writes_the_report_and_the_dashboard_updates_live(
    synthetic_checkpoints, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium_driver, read_numbers, save_screenshot

    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "recloop.cli", "demo", "--quick", "--synthetic"]
    home = short_home("demo")  # Ray's socket paths live under it: keep it short
    cmd += ["--home", str(home), "--checkpoint", str(synthetic_checkpoints[0])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    try:
        url = _wait_for_line(log, r"dashboard \(live[^)]*\): (\S+)", proc, 240)
        _wait_for_line(log, r"run (\S+): simulating", proc, 300)
        deadline = time.monotonic() + 120
        while _serving_requests(url) < 20:  # traffic is flowing through the loop
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2.0)

        driver = chromium_driver()
        try:
            driver.get(url)

            def charts_have_data(d) -> bool:
                return all(
                    int(d.find_element(By.ID, c).get_attribute("data-points") or 0) >= 2
                    for c in CHARTS
                )

            WebDriverWait(driver, 60, poll_frequency=1.0).until(charts_have_data)
            first = read_numbers(driver)
            assert int(first["requests"]) > 0, first
            WebDriverWait(driver, 60, poll_frequency=1.0).until(
                lambda d: read_numbers(d)["requests"] != first["requests"]
            )
            second = read_numbers(driver)
            assert int(second["requests"]) > int(first["requests"]), (first, second)
            rows = driver.find_elements(By.CSS_SELECTOR, "#arms [data-arm]")
            assert {r.get_attribute("data-arm") for r in rows} == {
                "control",
                "popularity",
                "online",
                "online-ipa",
            }
            shot = save_screenshot(driver, "dashboard-live")
            assert shot.stat().st_size > 20_000
        finally:
            driver.quit()

        metrics = requests.get(url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith(
            "text/plain"
        )
        landed = re.search(r"^recloop_ingest_records_total (\S+)$", metrics.text, re.M)
        assert landed and float(landed.group(1)) > 0, metrics.text[:2000]
        assert 'recloop_arm_info{arm="online-ipa"' in metrics.text

        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(home / "demo", ignore_errors=True)  # the stack's data; the report stays
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]

    summary = json.loads(Path(re.search(r"summary: (\S+)", text).group(1)).read_text())
    arms = {"control", "popularity", "online", "online-ipa"}
    assert {a["name"] for a in summary["run"]["arms"]} == arms
    assert summary["headline"].startswith("session watch time against control")
    assert {(v["arm"], v["metric"]) for v in summary["verdict"]} >= {
        ("online", "swt"),
        ("online-ipa", "swt"),
    }
    assert set(summary["online_over_time"]) == arms
    assert all(len(rows) >= 2 for rows in summary["online_over_time"].values())
    for arm in ("online", "online-ipa"):  # each learning arm trained and was gated
        decided = [v for v in summary["versions"][arm] if v["status"] in ("promoted", "rejected")]
        assert decided and all(v["reason"] for v in decided), summary["versions"][arm]
        assert summary["training"][arm] and summary["training"][arm][0]["ntp_loss"] > 0
    # the popularity arm's counts followed its clicks: recounted and promoted
    recounts = [v for v in summary["versions"]["popularity"] if v["status"] == "promoted"]
    assert recounts, summary["versions"]["popularity"]
    # the hidden model's oracle is in every tenth the arms have sessions in
    assert all(
        r.get("oracle_gap") is not None
        for rows in summary["online_over_time"].values()
        for r in rows
    )
    ipa = summary["training"]["online-ipa"]
    assert any(r["reward_loss"] is not None and r["reward_auc"] for r in ipa), ipa
    assert summary["dpo"]["timeline"] and summary["dpo"]["totals"]["offered"] > 0
    assert summary["ingest"]["timeline"] and summary["ingest"]["timeline"][-1]["records"] > 0
    assert summary["feedback_to_serving"]["timeline"]
    assert summary["feedback_to_serving"]["per_version"]
    assert summary["serving"]["timeline"] and summary["serving"]["latency_ms"]["n"] > 0

    report = Path(re.search(r"report: (\S+)", text).group(1))
    html = report.read_text()
    figures = sorted((report.parent / "figures").glob("*.png"))
    assert len(figures) == 8, figures
    assert all(f"figures/{f.name}" in html for f in figures)
