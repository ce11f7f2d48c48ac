"""The demo's experiment report: figures, readings, HTML, graceful gaps and the CLI."""

from __future__ import annotations

import copy
import html
import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from pipelines.analysis.report import FIGURES, main, render_report

FIGURE_IDS = [fid for fid, _, _ in FIGURES]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_summary(control: str = "control") -> dict:
    """A small but realistic summary: 3 arms, 10 timeline points, 3 training rounds."""
    arms = [
        (control, 0.34, "frozen"),
        ("online", 0.33, "online"),
        ("online-ipa", 0.33, "online-ipa"),
    ]
    ts = [60.0 * (i + 1) for i in range(10)]

    def metrics(base: float, slope: float) -> list[dict]:
        rows = []
        for i, t in enumerate(ts):
            swt, vtr, ltr = base + slope * i, 0.40 + 0.002 * i, 0.05 + 0.001 * i
            rows.append(
                {
                    "t_s": t,
                    "sessions": 50 * (i + 1),
                    "swt": swt,
                    "swt_ci": [swt - 3, swt + 3] if i else None,
                    "vtr": vtr,
                    "vtr_ci": [vtr - 0.02, vtr + 0.02],
                    "ltr": ltr,
                    "ltr_ci": [ltr - 0.01, ltr + 0.01],
                    "expected_swt": 0.9 * swt,
                    "oracle_swt": 200.0,
                    "oracle_gap": 1 - 0.9 * swt / 200.0,
                }
            )
        return rows

    def versions(arm: str) -> list[dict]:
        rows = [{"t_s": 0.0, "round": None, "version": "seed", "status": "seed", "reason": "seed"}]
        if arm != control:
            for r, status in enumerate(["promoted", "rejected", "promoted"], start=1):
                rows.append(
                    {
                        "t_s": 150.0 * r,
                        "round": r,
                        "version": f"{arm}-v{r}",
                        "status": status,
                        "reason": f"gate {status} round {r}",
                    }
                )
        return rows

    def training(arm: str) -> list[dict]:
        return [
            {
                "round": r,
                "t_s": 150.0 * r,
                "status": "done",
                "examples": 1000 * r,
                "pairs": 40 * r if arm == "online-ipa" else 0,
                "round_s": 30.0 + r,
                "ntp_loss": 5.0 - 0.3 * r,
                "dpo_loss": 0.69 - 0.05 * r if arm == "online-ipa" else None,
                "reward_loss": 0.6 - 0.02 * r,
                "reward_auc": {"vtr": 0.6 + 0.03 * r, "ltr": 0.55, "wtr": 0.52},
            }
            for r in (1, 2, 3)
        ]

    return {
        "run": {
            "run_id": "demo-123",
            "started_at": 1.7e9,
            "wall_s": 620.0,
            "machine": "2 cores",
            "quick": True,
            "data": "synthetic",
            "seed_checkpoint": "ckpt/seed",
            "dpo_fraction": 0.1,
            "sessions": 1500,
            "control": control,
            "arms": [{"name": n, "share": s, "learning": m} for n, s, m in arms],
        },
        "headline": "online-ipa beat control in session watch time.",
        "verdict": [
            {
                "arm": "online-ipa",
                "control": control,
                "metric": "swt",
                "control_value": 100.0,
                "arm_value": 105.0,
                "rel_lift": 0.05,
                "ci": [0.01, 0.09],
                "p_value": 0.012,
                "verdict": "better",
            },
            {
                "arm": "online",
                "control": control,
                "metric": "vtr",
                "control_value": 0.4,
                "arm_value": 0.39,
                "rel_lift": -0.025,
                "ci": [-0.06, 0.01],
                "p_value": 0.31,
                "verdict": "n.s.",
            },
        ],
        "online_over_time": {
            control: metrics(100, 0.1),
            "online": metrics(100, 0.3),
            "online-ipa": metrics(100, 0.5),
        },
        "versions": {n: versions(n) for n, _, _ in arms},
        "training": {"online": training("online"), "online-ipa": training("online-ipa")},
        "dpo": {
            "timeline": [
                {
                    "t_s": t,
                    "offered": 30 * i,
                    "processed": 25 * i,
                    "emitted": 20 * i,
                    "dropped": 5 * i,
                }
                for i, t in enumerate(ts, start=1)
            ],
            "totals": {
                "offered": 300,
                "processed": 250,
                "emitted": 200,
                "dropped": 50,
                "cpu_s_per_request": 0.42,
            },
        },
        "ingest": {
            "timeline": [
                {
                    "t_s": t,
                    "lag": 100 + 10 * i,
                    "freshness_p50_ms": 800.0 + i,
                    "freshness_p99_ms": 2500.0 + i,
                    "records": 1000 * (i + 1),
                }
                for i, t in enumerate(ts)
            ]
        },
        "feedback_to_serving": {
            "timeline": [
                {"t_s": t, "arm": a, "feedback_age_s": 30.0 + (t % 150)}
                for t in ts
                for a in ("online", "online-ipa")
            ],
            "per_version": [
                {"arm": a, "version": f"{a}-v{r}", "round": r, "feedback_to_serving_s": 60.0 + r}
                for a in ("online", "online-ipa")
                for r in (1, 3)
            ],
        },
        "serving": {
            "timeline": [
                {
                    "t_s": t,
                    "requests_per_s": 20.0 + i,
                    "p50_ms": 10.0 + i,
                    "p90_ms": 20.0 + i,
                    "p99_ms": 40.0 + i,
                }
                for i, t in enumerate(ts)
            ],
            "latency_ms": {"p50": 12.3, "p90": 25.0, "p99": 45.6, "mean": 14.0, "n": 12345},
            "requests_per_s": 21.4,
            "by_arm": {n: {"p50_ms": 12.0, "p99_ms": 45.0, "n": 4000} for n, _, _ in arms},
        },
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("report")
    result = render_report(make_summary(), out)
    return result, (out / "report.html").read_text(encoding="utf-8"), out


def test_writes_html_and_one_valid_png_per_figure(full: tuple[dict, str, Path]) -> None:
    result, _, out = full
    assert Path(result["html"]) == out / "report.html"
    assert [f["id"] for f in result["figures"]] == FIGURE_IDS
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{fid}.png" for fid in FIGURE_IDS
    )
    for f in result["figures"]:
        png = Path(f["file"])
        assert png == out / "figures" / f"{f['id']}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5_000
        img = mpimg.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.01  # not a blank canvas


def test_html_has_titles_readings_verdicts_in_order(full: tuple[dict, str, Path]) -> None:
    result, page, _ = full
    for f in result["figures"]:
        assert f["title"] in page and f["reading"] and html.escape(f["reading"]) in page
        assert f'src="figures/{f["id"]}.png"' in page
    positions = [page.index(f'id="{fid}"') for fid in FIGURE_IDS]
    assert positions == sorted(positions)
    assert (
        page.index("Verdict") < positions[0] < positions[-1] < page.index("<h2>Model versions</h2>")
    )
    for text in [
        "+5.0%",
        "[+1.0%, +9.0%]",
        "0.012",
        "-2.5%",
        "0.310",
        "session watch time (s)",
        "view rate",
        "demo-123",
        "ckpt/seed",
        "online-ipa 33.0% (online-ipa)",
        "online-ipa beat control",
        "gate rejected round 2",
        "online-ipa-v3",
    ]:
        assert text in page, text
    assert "http" not in page and "<script" not in page


def test_readings_are_computed_from_the_data(full: tuple[dict, str, Path]) -> None:
    readings = {f["id"]: f["reading"] for f in full[0]["figures"]}
    # The second half, session-weighted (mean bucket index 7.25): 103.625 vs 100.725 s.
    assert (
        "online-ipa 2.9% above control in session watch time over the second half of the run"
        in (readings["online_metrics"])
    )
    assert "significant over the run (p = 0.01)" in readings["online_metrics"]
    assert "online: 2 promoted, 1 rejected" in readings["versions"]
    assert "200 DPO pairs emitted; 83.3% of 300 offered requests processed" in readings["dpo_pairs"]
    assert "p50 12.3 ms, p99 45.6 ms over 12,345 requests" in readings["serving"]
    assert (
        "online-ipa over 3 rounds: NTP loss 4.700 → 4.100, DPO loss 0.640 → 0.540, "
        "reward loss 0.580 → 0.540, view AUC 0.690"
    ) in readings["training_losses"]
    assert "ingest lag ended at 190 records (max 190)" in readings["ingest"]
    assert "median feedback-to-serving 62 s over 2 versions" in readings["feedback_to_serving"]

    assert (
        "gap to the oracle in the last tenth of the run: online-ipa 53.0%, online 53.8%, "
        "control 54.6%"
    ) in readings["oracle_gap"]
    with_pop = make_summary()
    with_pop["run"]["arms"].append({"name": "popularity", "share": 0.25, "learning": "online"})
    rows = copy.deepcopy(with_pop["online_over_time"]["online-ipa"])
    for r in rows:
        r["swt"] += 0.9  # the last tenth: 105.4 s against online-ipa's 104.5 s
    with_pop["online_over_time"]["popularity"] = rows
    reading = next(
        f["reading"]
        for f in render_report(with_pop, full[2] / "pop")["figures"]
        if f["id"] == "oracle_gap"
    )
    assert "the best learning arm (online-ipa, 104.5 s) is below popularity (105.4 s)" in reading, (
        reading
    )

    summary = make_summary()
    summary["dpo"]["totals"]["emitted"] = 1234
    changed = render_report(summary, full[2] / "changed")
    reading = next(f["reading"] for f in changed["figures"] if f["id"] == "dpo_pairs")
    assert "1,234 DPO pairs emitted" in reading


def test_strings_are_escaped(tmp_path: Path) -> None:
    summary = make_summary(control="<script>alert(1)</script>")
    summary["headline"] = "a & b <b>bold</b>"
    result = render_report(summary, tmp_path)
    page = Path(result["html"]).read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert all(f["file"] for f in result["figures"])


def test_empty_sections_degrade_to_no_data(tmp_path: Path) -> None:
    summary = make_summary()
    summary["dpo"]["timeline"] = []
    summary["training"] = {}
    del summary["ingest"]
    summary["feedback_to_serving"]["timeline"] = [{"arm": "online"}]  # malformed: no t_s
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "dpo_pairs.png").write_bytes(b"stale")
    result = render_report(summary, tmp_path)
    by_id = {f["id"]: f for f in result["figures"]}
    page = Path(result["html"]).read_text(encoding="utf-8")
    for fid in ("dpo_pairs", "training_losses", "ingest", "feedback_to_serving"):
        assert by_id[fid]["file"] is None and by_id[fid]["reading"].startswith("no data: ")
        assert html.escape(by_id[fid]["reading"]) in page
        assert f'src="figures/{fid}.png"' not in page
        assert not (tmp_path / "figures" / f"{fid}.png").exists()
    assert page.count("no data: ") == 4
    assert "malformed (KeyError" in by_id["feedback_to_serving"]["reading"]
    assert by_id["serving"]["file"] is not None


def test_bare_summary_renders(tmp_path: Path) -> None:
    result = render_report({"run": {}}, tmp_path)
    page = Path(result["html"]).read_text(encoding="utf-8")
    assert all(f["file"] is None for f in result["figures"])
    assert page.count("no data: ") == len(FIGURES) + 2  # figures, verdicts, versions


def test_cli_rerenders_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = make_summary()
    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary), encoding="utf-8")
    assert main([str(path)]) == 0
    assert (path.parent / "report.html").exists()
    assert len(list((path.parent / "figures").glob("*.png"))) == len(FIGURES)
    assert capsys.readouterr().out.strip() == str(path.parent / "report.html")
    assert main([str(path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert "demo-123" in (tmp_path / "elsewhere" / "report.html").read_text(encoding="utf-8")
