"""The loop's monitor: online metrics from the lake, the Prometheus text, the terminal view."""

from __future__ import annotations

import time

import pyarrow as pa

from recloop.lake import SCHEMAS, SESSIONS, Entry, Lake
from recloop.monitor import _finite, _OnlineTally, format_snapshot, prometheus_text


def _session(i: int, arm: str, clicks: list[bool], record_ts_ms: int, liked: int = 0) -> dict:
    n = len(clicks)
    return {
        "event_id": f"e{i}",
        "request_id": f"r{i}",
        "user_id": i,
        "arm": arm,
        "model_version": "v1",
        "event_time_ms": 1_700_000_000_000 + i,
        "history": [1, 2],
        "items": list(range(10, 10 + n)),
        "scores": [0.0] * n,
        "feedback": [True] * n,
        "clicked": clicks,
        "watch_time_s": [30.0 if c else 0.0 for c in clicks],
        "liked": [False] * n,
        "followed": [False] * n,
        "n_feedback": n,
        "clicks": sum(clicks),
        "session_watch_s": 30.0 * sum(clicks),
        "likes": liked,
        "follows": 0,
        "last_feedback_ms": 1_700_000_000_500 + i,
        "record_ts_ms": record_ts_ms,
        "closed_by": "complete",
        "context": "{}",
    }


def _commit(lake: Lake, rows: list[dict], seq: int) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[SESSIONS])
    files = lake.write_files(SESSIONS, table, "ingestor-0", seq)
    lake.commit(Entry("ingestor-0", seq, seq, files, {}, {"sessions": len(rows)}))


def test_online_metrics_per_arm_all_and_recent_window_read_incrementally(tmp_path):
    lake = Lake(tmp_path)
    now = int(time.time() * 1000)
    old = now - 600_000  # outside the 60 s window
    _commit(
        lake,
        [
            _session(0, "a", [True, False, False, False], old),  # 1 view of 4, 30 s
            _session(1, "b", [True, True, True, True], old, liked=2),
        ],
        1,
    )
    tally = _OnlineTally(tmp_path, window_s=60.0)
    first = tally.update()
    assert first["a"]["sessions"] == 1 and first["a"]["swt"] == 30.0
    assert first["a"]["vtr"] == 0.25 and first["b"]["ltr"] == 0.5
    assert first["a"]["recent"]["sessions"] == 0 and first["a"]["recent"]["swt"] is None

    _commit(lake, [_session(2, "a", [True, True, False, False], now)], 2)
    second = tally.update()
    assert second["a"]["sessions"] == 2
    assert second["a"]["swt"] == 45.0  # (30 + 60) / 2
    assert second["a"]["vtr"] == 3 / 8
    recent = second["a"]["recent"]
    assert recent["sessions"] == 1 and recent["swt"] == 60.0 and recent["vtr"] == 0.5
    assert tally.sessions == 3
    assert tally.update() == second  # nothing new: the same figures, no row counted twice


SNAP = {
    "t": 1_800_000_000.0,
    "arms": {
        "control": {"share": 0.5, "learning": "frozen", "version": "v1"},
        'on"line': {"share": 0.5, "learning": "online", "version": "v2"},
    },
    "online": {
        "control": {
            "sessions": 10,
            "swt": 50.0,
            "vtr": 0.3,
            "ltr": 0.01,
            "wtr": 0.0,
            "recent": {
                "window_s": 60,
                "sessions": 2,
                "swt": 40.0,
                "vtr": 0.2,
                "ltr": None,
                "wtr": None,
            },
        },  # fmt: skip
    },
    "ingest": {
        "lag": 7,
        "records": 1234,
        "records_per_s": 20.0,
        "freshness_p50_ms": 900.0,
        "freshness_p99_ms": 2500.0,
        "dead_lettered": 1,
        "lake_sessions": 10,
    },  # fmt: skip
    "training": {
        'on"line': {
            "round": 3,
            "status": "promoted",
            "version": "v2",
            "rounds": 3,
            "promoted": 2,
            "rejected": 1,
            "ntp_loss": 2.5,
            "dpo_loss": None,
            "reward_auc": None,
            "feedback_age_s": 42.0,
            "feedback_to_serving_s": 30.0,
            "running": False,
        },  # fmt: skip
    },
    "dpo": None,
    "serving": {
        "requests": 500,
        "errors": 2,
        "requests_per_s": 8.5,
        "latency_ms": {"p50": 40.0, "p90": 80.0, "p99": 120.0, "n": 500},
    },  # fmt: skip
    "errors": {"dpo": "ValueError: no sampler"},
}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``text`` as a Prometheus scraper parses it: (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_text_has_the_documented_metrics_with_labels_and_no_empty_values():
    text = prometheus_text(SNAP)
    s = _samples(text)
    watch = "recloop_online_session_watch_seconds"
    assert s[(watch, (("arm", "control"), ("window", "all")))] == 50.0
    assert s[(watch, (("arm", "control"), ("window", "recent")))] == 40.0
    assert s[("recloop_ingest_lag_records", ())] == 7
    assert s[("recloop_ingest_records_total", ())] == 1234
    assert s[("recloop_training_rounds_total", (("arm", 'on"line'), ("status", "rejected")))] == 1
    info = (("arm", "control"), ("learning", "frozen"), ("version", "v1"))
    assert s[("recloop_arm_info", info)] == 1
    # None values are left out rather than written as NaN; no sampler: no dpo samples.
    assert 'window="recent"' in text and "recloop_online_like_rate{" in text
    assert not any(v != v for v in s.values())
    assert not any(name.startswith("recloop_dpo_requests") for name, _ in s)
    assert "# TYPE recloop_training_rounds_total counter" in text
    # Per-request figures are Ray metrics of each replica (histograms that add up over
    # replicas), not gauges of one replica's window here.
    assert "recloop_serving" not in text and "quantile" not in text
    assert prometheus_text(None).count("# TYPE") == text.count("# TYPE")


def test_terminal_view_shows_arms_versions_metrics_and_the_parts_that_did_not_answer():
    view = format_snapshot(SNAP)
    assert "control" in view and "v2" in view and "3 promoted" in view
    assert "500 requests" in view and "p99 120 ms" in view and "lag 7" in view
    assert "dpo: ValueError: no sampler" in view


def test_snapshots_carry_no_nan():
    assert _finite({"a": [float("nan"), 1.0], "b": {"c": float("inf")}}) == {
        "a": [None, 1.0],
        "b": {"c": None},
    }
