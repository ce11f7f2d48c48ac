"""The demo's helpers: clearing a previous run's state, the headline sentence."""

from __future__ import annotations

from pipelines.demo import headline, reset_home


def test_reset_home_clears_a_previous_demo_but_keeps_the_fitted_user_model(tmp_path):
    home = tmp_path / "demo"
    kept = home / "sim" / "user_model" / "abc" / "model.json"
    gone = [home / "kafka" / "data" / "x.log", home / "sim" / "runs" / "r1" / "manifest.json"]
    for path in [kept, *gone]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (home / "registry.json").write_text("{}")
    reset_home(home)
    assert kept.read_text() == "{}"
    assert not any(p.exists() for p in gone)
    assert sorted(p.name for p in home.iterdir()) == ["sim"]
    assert [p.name for p in (home / "sim").iterdir()] == ["user_model"]
    reset_home(tmp_path / "absent")  # nothing to clear: no error


def test_headline_reads_each_arms_session_watch_time_against_control():
    rows = [
        {
            "arm": "online",
            "metric": "swt",
            "rel_lift": 0.064,
            "ci": [-0.061, 0.215],
            "p_value": 0.339,
            "verdict": "no significant difference",
        },  # fmt: skip
        {
            "arm": "online",
            "metric": "vtr",
            "rel_lift": 0.5,
            "ci": None,
            "p_value": 0.0,
            "verdict": "win",
        },  # fmt: skip
        {
            "arm": "ipa",
            "metric": "swt",
            "rel_lift": -0.01,
            "ci": None,
            "p_value": None,
            "verdict": "no verdict",
        },  # fmt: skip
    ]
    assert headline(rows, "control") == (
        "session watch time against control: online +6.4% [-6.1%, +21.5%], p = 0.34 "
        "(no significant difference); ipa -1.0% (no verdict)"
    )
    assert headline([], "control").startswith("no comparison")
    adjusted = [
        {**r, "variance_reduction": cut} for r, cut in zip(rows, (0.31, 0.9, 0.12), strict=True)
    ]
    assert headline(adjusted, "control").startswith(
        "session watch time against control (CUPED on the users' pre-run history: 12%-31% of "
        "the variance taken out): online +6.4%"
    )
