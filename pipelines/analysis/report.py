"""The experiment report of ``recloop demo``: one self-contained HTML page plus PNG figures.

Everything is drawn from the JSON summary the demo writes (see ``render_report``), so a
saved summary re-renders the same report: ``python -m pipelines.analysis.report SUMMARY.json``.

The page shows a header (run id, machine, wall time, arms with their traffic shares and
learning mode, data, seed checkpoint), the headline sentence, the verdict table (lift of
each arm over control with its 95% CI and p-value), then eight figures, each with a
one-line reading computed from the data:

1. ``online_metrics``: session watch time, view rate and like rate per arm over time;
2. ``oracle_gap``: each arm's gap to the hidden model's oracle (1 - expected / best
   achievable session watch time) per tenth of the run, and in the last tenth the best
   learning arm against the popularity arm;
3. ``versions``: the model versions each arm seeded, promoted, rejected or skipped;
4. ``training_losses``: NTP, DPO and reward-model losses (and view AUC) by round;
5. ``dpo_pairs``: DPO requests offered and processed and the pairs emitted, over time;
6. ``ingest``: ingest lag and feature freshness over time;
7. ``feedback_to_serving``: how old the feedback behind each arm's serving model is;
8. ``serving``: serving latency percentiles and request rate over time;

and ends with the table of model versions. A figure whose data is missing, empty or
malformed is replaced by a "no data: <why>" line.

The summary (``t_s``: wall-clock seconds since the simulation started; every section may
be missing; rates are fractions of items shown; lifts and CIs are relative, 0.05 = +5%):

- ``run``: run_id, started_at (unix s), wall_s, machine, quick, data, seed_checkpoint,
  dpo_fraction, sessions, control, arms [{name, share, learning: frozen|online|online-ipa}];
- ``headline``: one sentence;
- ``verdict``: [{arm, control, metric: swt|vtr|ltr|wtr|expected_swt, control_value,
  arm_value, rel_lift, ci: [lo, hi], p_value, verdict}];
- ``online_over_time``: {arm: [{t_s, sessions, swt, swt_ci, vtr, vtr_ci, ltr, ltr_ci,
  expected_swt, oracle_swt, oracle_gap}]};
- ``versions``: {arm: [{t_s, round, version, status: seed|promoted|rejected|skipped, reason}]};
- ``training``: {arm: [{round, t_s, status, examples, pairs, round_s, ntp_loss, dpo_loss,
  reward_loss, reward_auc: {vtr, ltr, wtr}}]};
- ``dpo``: {timeline: [{t_s, offered, processed, emitted, dropped}] (cumulative),
  totals: {offered, processed, emitted, dropped, cpu_s_per_request}};
- ``ingest``: {timeline: [{t_s, lag (records), freshness_p50_ms, freshness_p99_ms, records}]};
- ``feedback_to_serving``: {timeline: [{t_s, arm, feedback_age_s}],
  per_version: [{arm, version, round, feedback_to_serving_s}]};
- ``serving``: {timeline: [{t_s, requests_per_s, p50_ms, p90_ms, p99_ms}],
  latency_ms: {p50, p90, p99, mean, n} (client side), requests_per_s, by_arm}.
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRIC_NAMES = {
    "swt": "session watch time (s)",
    "vtr": "view rate",
    "ltr": "like rate",
    "wtr": "follow rate",
    "expected_swt": "expected watch time (s)",
}
RATE_METRICS = {"vtr", "ltr", "wtr"}
STATUS_STYLE = {  # marker, colour, size
    "seed": ("o", "tab:green", 60),
    "promoted": ("o", "tab:green", 60),
    "rejected": ("x", "tab:red", 60),
    "skipped": (".", "grey", 40),
}
NAN = float("nan")
TIME = "wall time since start (min)"
UTC = "%Y-%m-%d %H:%M:%S UTC"


class NoData(Exception):
    """A figure's section is missing or empty; the message says why."""


def _minutes(rows: list[dict]) -> list[float]:
    return [float(r["t_s"]) / 60.0 for r in rows]


def _vals(rows: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [NAN if r.get(key) is None else float(r[key]) * scale for r in rows]


def _label(s: object) -> str:
    return str(s).replace("$", r"\$")  # no mathtext from user strings


def _pct(x: float | None, signed: bool = True) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _colors(summary: dict) -> dict[str, str]:
    names = [a["name"] for a in (summary.get("run") or {}).get("arms") or []]
    for sec in ("online_over_time", "versions", "training"):
        names += [n for n in summary.get(sec) or {} if n not in names]
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def _learning_arms(summary: dict) -> list[str]:
    arms = (summary.get("run") or {}).get("arms") or []
    return [a["name"] for a in arms if a.get("learning") != "frozen"]


def _finish(ax: Any, xlabel: str | None, ylabel: str, legend: bool = True) -> None:
    """Axis labels, a light grid, and a legend where there is more than one series."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=8)


def _p_text(summary: dict, arm: str, metric: str) -> str:
    for v in summary.get("verdict") or []:
        if v.get("arm") == arm and v.get("metric") == metric and v.get("p_value") is not None:
            p = v["p_value"]
            shown = f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"
            return f"{'significant' if p < 0.05 else 'n.s.'} over the run (p = {shown})"
    return "not tested over the run"


# --- figures: each returns (figure, reading) or raises NoData --------------------------


def fig_online_metrics(s: dict) -> tuple[Figure, str]:
    series = {a: rows for a, rows in (s.get("online_over_time") or {}).items() if rows}
    if not series:
        raise NoData("no online metrics were recorded")
    colors = _colors(s)
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    panels = [("swt", 1, "session watch time (s)"), ("vtr", 100, "view rate (%)")]
    for ax, (key, k, ylab) in zip(axes, [*panels, ("ltr", 100, "like rate (%)")], strict=True):
        for arm, rows in series.items():
            x, c = _minutes(rows), colors.get(arm, "k")
            ax.plot(x, _vals(rows, key, k), marker=".", color=c, label=_label(arm))
            ci = [r.get(f"{key}_ci") or (None, None) for r in rows]
            lo, hi = ([NAN if b is None else b * k for b in band] for band in zip(*ci, strict=True))
            ax.fill_between(x, lo, hi, color=c, alpha=0.15, linewidth=0)
        _finish(ax, TIME if key == "ltr" else None, ylab, legend=key == "swt")
    control, parts = (s.get("run") or {}).get("control"), []
    # The second half of the run, session-weighted: one bucket alone is too noisy to read.
    ref_rows = {r["t_s"]: r for r in series.get(control, []) if r.get("swt") is not None}
    for arm, rows in series.items():
        both = [
            (ref_rows[r["t_s"]], r)
            for r in rows
            if r.get("swt") is not None and r["t_s"] in ref_rows
        ]
        both = both[len(both) // 2 :]
        if arm != control and both:
            arm_w = sum(r["swt"] * r["sessions"] for _, r in both) / sum(
                r["sessions"] for _, r in both
            )
            ref_w = sum(c["swt"] * c["sessions"] for c, _ in both) / sum(
                c["sessions"] for c, _ in both
            )
            lift = arm_w / ref_w - 1 if ref_w else 0.0
            parts.append(
                f"{arm} {abs(lift) * 100:.1f}% {'above' if lift >= 0 else 'below'} "
                f"{control} in session watch time over the second half of the run; "
                f"{_p_text(s, arm, 'swt')}"
            )
    if not parts:
        ends = [f"{a} {r[-1]['swt']:.1f} s" for a, r in series.items() if r[-1].get("swt")]
        parts = [f"session watch time in the last bucket: {', '.join(ends) or 'none'}"]
    return fig, "; ".join(parts)


def last_tenth(s: dict) -> dict[str, dict[str, float]]:
    """Each arm's swt, expected and oracle swt and gap in the last bucket of the run
    (a tenth of it), from ``online_over_time``."""
    out = {}
    for arm, rows in (s.get("online_over_time") or {}).items():
        if rows and rows[-1].get("swt") is not None:
            r = rows[-1]
            out[arm] = {
                k: r.get(k) for k in ("swt", "expected_swt", "oracle_swt", "oracle_gap", "sessions")
            }
    return out


def fig_oracle_gap(s: dict) -> tuple[Figure, str]:
    series = {
        a: rows
        for a, rows in (s.get("online_over_time") or {}).items()
        if any(r.get("oracle_gap") is not None for r in rows)
    }
    if not series:
        raise NoData("the simulator recorded no oracle values")
    colors = _colors(s)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for arm, rows in series.items():
        ax.plot(
            _minutes(rows),
            _vals(rows, "oracle_gap", 100),
            marker=".",
            color=colors.get(arm, "k"),
            label=_label(arm),
        )
    _finish(ax, TIME, "gap to the oracle (%)")
    end = last_tenth(s)
    parts = [
        f"{a} {e['oracle_gap'] * 100:.1f}%"
        for a, e in sorted(end.items(), key=lambda kv: kv[1].get("oracle_gap") or 1.0)
        if e.get("oracle_gap") is not None
    ]
    text = "gap to the oracle in the last tenth of the run: " + ", ".join(parts)
    arms = {a["name"]: a for a in (s.get("run") or {}).get("arms", [])}
    pop = [a for a in end if a in arms and a.startswith("popularity")]
    learners = [a for a in end if a in arms and arms[a].get("learning") != "frozen"]
    learners = [a for a in learners if a not in pop]
    if pop and learners:
        best = max(learners, key=lambda a: end[a]["swt"])
        p, b = end[pop[0]]["swt"], end[best]["swt"]
        text += (
            f"; the best learning arm ({best}, {b:.1f} s) is "
            f"{'at or above' if b >= p else 'below'} {pop[0]} ({p:.1f} s) in session watch time"
        )
    return fig, text


def fig_versions(s: dict) -> tuple[Figure, str]:
    versions = {a: rows for a, rows in (s.get("versions") or {}).items() if rows}
    if not versions:
        raise NoData("no model versions were recorded")
    arms = list(versions)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(arms)))
    seen: set[str] = set()
    for y, arm in enumerate(arms):
        for r in versions[arm]:
            status, x = r.get("status", "skipped"), r["t_s"] / 60
            marker, color, size = STATUS_STYLE.get(status, STATUS_STYLE["skipped"])
            label = "seed / promoted" if status in ("seed", "promoted") else status
            ax.scatter(
                x,
                y,
                marker=marker,
                color=color,
                s=size,
                zorder=3,
                label=None if label in seen else label,
            )
            seen.add(label)
            if r.get("round") is not None:
                ax.annotate(
                    str(r["round"]),
                    (x, y),
                    xytext=(0, 7),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                )
    ax.set_yticks(range(len(arms)), [_label(a) for a in arms])
    ax.set_ylim(-0.6, len(arms) - 0.4)
    _finish(ax, TIME, "arm (labels: training round)")
    parts = []
    for arm in arms:
        n = {k: sum(r.get("status") == k for r in versions[arm]) for k in STATUS_STYLE}
        skipped = f", {n['skipped']} skipped" if n["skipped"] else ""
        parts.append(f"{arm}: {n['promoted']} promoted, {n['rejected']} rejected{skipped}")
    return fig, "; ".join(parts)


def fig_training_losses(s: dict) -> tuple[Figure, str]:
    training = {a: rows for a, rows in (s.get("training") or {}).items() if rows}
    if not training:
        raise NoData("no training rounds were recorded")
    colors, parts = _colors(s), {arm: [] for arm in training}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    panels = [
        ("ntp_loss", "NTP loss (nats/token)", "NTP"),
        ("dpo_loss", "DPO loss (nats/pair)", "DPO"),
        ("reward_loss", "reward-model loss (nats)", "reward"),
    ]
    for ax, (key, ylab, name) in zip(axes, panels, strict=True):
        for arm, rows in training.items():
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    color=colors.get(arm, "k"),
                    label=_label(arm),
                )
                parts[arm].append(f"{name} loss {pts[0][1]:.3f} → {pts[-1][1]:.3f}")
        if not ax.lines:
            ax.text(0.5, 0.5, "no rounds with this loss", ha="center", transform=ax.transAxes)
        ax.set_title(f"{name} loss", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax, "training round", ylab)
    auc_ax = axes[2].twinx()
    for arm, rows in training.items():
        pts = [
            (r["round"], r["reward_auc"]["vtr"])
            for r in rows
            if (r.get("reward_auc") or {}).get("vtr") is not None
        ]
        if pts:
            auc_ax.plot(*zip(*pts, strict=True), marker="s", ls="--", color=colors.get(arm, "k"))
            parts[arm].append(f"view AUC {pts[-1][1]:.3f}")
    auc_ax.set_ylabel("view AUC (dashed; 0–1)")
    rounds = {arm: len(rows) for arm, rows in training.items()}
    reading = "; ".join(
        f"{a} over {rounds[a]} rounds: {', '.join(b)}" for a, b in parts.items() if b
    )
    return fig, reading or "no losses were recorded"


def fig_dpo_pairs(s: dict) -> tuple[Figure, str]:
    dpo = s.get("dpo") or {}
    rows = dpo.get("timeline") or []
    if not rows:
        raise NoData("the DPO sampler recorded no timeline")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, what in [
        ("offered", "requests"),
        ("processed", "requests"),
        ("emitted", "pairs"),
        ("dropped", "requests"),
    ]:
        ax.plot(_minutes(rows), _vals(rows, key), marker=".", label=f"{what} {key}")
    _finish(ax, TIME, "cumulative count (requests / pairs)")
    tot = {k: v for k, v in (dpo.get("totals") or {}).items() if v is not None}
    for k in ("offered", "processed", "emitted", "dropped"):
        tot.setdefault(k, rows[-1].get(k) or 0)
    reading = f"{int(tot['emitted']):,} DPO pairs emitted"
    if tot["offered"]:
        share = tot["processed"] / tot["offered"] * 100
        reading += f"; {share:.1f}% of {int(tot['offered']):,} offered requests processed"
    reading += f", {int(tot['dropped']):,} dropped"
    if tot.get("cpu_s_per_request") is not None:
        reading += f"; {tot['cpu_s_per_request']:.2f} CPU s per request"
    return fig, reading


def fig_ingest(s: dict) -> tuple[Figure, str]:
    rows = (s.get("ingest") or {}).get("timeline") or []
    if not rows:
        raise NoData("the ingest pipeline recorded no timeline")
    x = _minutes(rows)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(x, _vals(rows, "lag"), marker=".", color="C0", label="ingest lag")
    _finish(ax1, None, "ingest lag (records)")
    ax2.plot(x, _vals(rows, "freshness_p50_ms", 1e-3), marker=".", label="p50")
    ax2.plot(x, _vals(rows, "freshness_p99_ms", 1e-3), marker=".", label="p99")
    _finish(ax2, TIME, "feature freshness (s)")
    lags = [r["lag"] for r in rows if r.get("lag") is not None]
    parts = [f"ingest lag ended at {lags[-1]:,} records (max {max(lags):,})"] if lags else []
    fresh = [r for r in rows if r.get("freshness_p50_ms") is not None]
    if fresh:
        p99 = fresh[-1].get("freshness_p99_ms")
        parts.append(
            f"feature freshness p50 {fresh[-1]['freshness_p50_ms'] / 1e3:.1f} s, "
            f"p99 {_num(None if p99 is None else p99 / 1e3)} s (last bucket)"
        )
    return fig, "; ".join(parts) or "no lag or freshness was measured"


def fig_feedback_to_serving(s: dict) -> tuple[Figure, str]:
    fts = s.get("feedback_to_serving") or {}
    rows, per_version = fts.get("timeline") or [], fts.get("per_version") or []
    if not rows and not per_version:
        raise NoData("no feedback-to-serving delays were recorded")
    colors = _colors(s)
    arms = list(dict.fromkeys([r["arm"] for r in rows] + [r["arm"] for r in per_version]))
    arms = [a for a in arms if a in _learning_arms(s)] or arms
    when = {
        (a, v.get("version")): v["t_s"] / 60
        for a, vs in (s.get("versions") or {}).items()
        for v in vs
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    parts = []
    for arm in arms:
        mine, c = [r for r in rows if r["arm"] == arm], colors.get(arm, "k")
        if mine:
            ax.plot(
                _minutes(mine),
                _vals(mine, "feedback_age_s"),
                color=c,
                label=f"{_label(arm)}: feedback age of the serving model",
            )
        delays = [
            (v.get("version"), v["feedback_to_serving_s"])
            for v in per_version
            if v["arm"] == arm and v.get("feedback_to_serving_s") is not None
        ]
        marks = [(when[(arm, ver)], d) for ver, d in delays if (arm, ver) in when]
        if marks:
            ax.scatter(
                *zip(*marks, strict=True),
                marker="D",
                color=c,
                zorder=3,
                label=f"{_label(arm)}: feedback-to-serving per version",
            )
        ages = [r["feedback_age_s"] for r in mine if r.get("feedback_age_s") is not None]
        if delays:
            med = statistics.median(d for _, d in delays)
            parts.append(
                f"{arm} median feedback-to-serving {med:.0f} s over {len(delays)} versions"
            )
        elif ages:
            parts.append(f"{arm} feedback age {ages[-1]:.0f} s at the end")
    _finish(ax, TIME, "feedback age (s)")
    return fig, "; ".join(parts) or "no delays were measured"


def fig_serving(s: dict) -> tuple[Figure, str]:
    srv = s.get("serving") or {}
    rows = srv.get("timeline") or []
    if not rows:
        raise NoData("serving recorded no timeline")
    x = _minutes(rows)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for q in ("p50", "p90", "p99"):
        ax1.plot(x, _vals(rows, f"{q}_ms"), marker=".", label=q)
    _finish(ax1, None, "latency (ms)")
    ax2.plot(x, _vals(rows, "requests_per_s"), marker=".", color="C3", label="requests/s")
    _finish(ax2, TIME, "throughput (requests/s)")
    lat = srv.get("latency_ms") or {}
    reading = (
        f"client-side latency p50 {_num(lat.get('p50'))} ms, p99 {_num(lat.get('p99'))} "
        f"ms over {int(lat.get('n') or 0):,} requests"
    )
    if srv.get("requests_per_s") is not None:
        reading += f"; {srv['requests_per_s']:.1f} requests/s over the run"
    br = srv.get("by_rounds") or {}
    during, between = br.get("during_rounds") or {}, br.get("between_rounds") or {}
    if during.get("n") and between.get("n"):
        reading += (
            f"; p99 {_num(during.get('p99'))} ms while a training round ran "
            f"({during['n']:,} requests) vs {_num(between.get('p99'))} ms between rounds "
            f"({_num(br.get('p99_ratio'))}x)"
        )
        promoting, rest = br.get("during_promotions") or {}, br.get("rest_of_rounds") or {}
        if promoting.get("n") and rest.get("n"):
            reading += (
                f"; of those, p99 {_num(promoting.get('p99'))} ms while a version was being "
                f"promoted ({promoting['n']:,}) and {_num(rest.get('p99'))} ms in the rest of "
                "the rounds"
            )
    return fig, reading


FIGURES: list[tuple[str, str, Callable[[dict], tuple[Figure, str]]]] = [
    ("online_metrics", "Online metrics per arm over time", fig_online_metrics),
    ("oracle_gap", "Gap to the oracle per arm over time", fig_oracle_gap),
    ("versions", "Model versions per arm", fig_versions),
    ("training_losses", "Training losses by round", fig_training_losses),
    ("dpo_pairs", "DPO preference pairs", fig_dpo_pairs),
    ("ingest", "Ingest lag and feature freshness", fig_ingest),
    ("feedback_to_serving", "Feedback-to-serving delay", fig_feedback_to_serving),
    ("serving", "Serving latency and throughput", fig_serving),
]


# --- HTML ------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}
img{max-width:100%}.reading{font-style:italic;margin-top:.2em}.nodata{color:#a00}
.headline{font-size:1.15em;font-weight:600}dl{display:grid;grid-template-columns:max-content 1fr}
dt{font-weight:600;padding-right:1em}dd{margin:0}"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[object]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _value(metric: str, x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 100:.2f}%" if metric in RATE_METRICS else f"{x:.2f}"


def _verdict_table(summary: dict) -> str:
    verdicts = summary.get("verdict") or []
    # CUPED-adjusted comparisons (the run file's analysis.covariates) show the plain test
    adjusted = any(v.get("variance_reduction") is not None for v in verdicts)
    rows = []
    for v in verdicts:
        m, ci, p = v.get("metric", ""), v.get("ci"), v.get("p_value")
        row = [
            v.get("arm", ""),
            METRIC_NAMES.get(m, m),
            _value(m, v.get("control_value")),
            _value(m, v.get("arm_value")),
            _pct(v.get("rel_lift")),
            f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "—",
            "—" if p is None else f"{p:.3f}",
            v.get("verdict", ""),
        ]
        if adjusted:
            p0, cut = v.get("unadjusted_p_value"), v.get("variance_reduction")
            row += [
                _pct(v.get("unadjusted_rel_lift")),
                "—" if p0 is None else f"{p0:.3f}",
                "—" if cut is None else _pct(cut, signed=False),
            ]
        rows.append(row)
    if not rows:
        return '<p class="nodata">no data: no verdicts were computed</p>'
    head = ["arm", "metric", "control value", "arm value", "lift", "95% CI", "p-value", "verdict"]
    if adjusted:
        head += ["unadjusted lift", "unadjusted p", "variance taken out (CUPED)"]
    return _table(head, rows)


def _header(summary: dict) -> str:
    run = summary.get("run") or {}
    arms = ", ".join(
        f"{a.get('name')} {_pct(a.get('share'), signed=False)} ({a.get('learning')})"
        for a in run.get("arms", [])
    )
    started, wall, n = run.get("started_at"), run.get("wall_s"), run.get("sessions")
    items = [
        ("run id", run.get("run_id", "?")),
        ("started", "?" if started is None else time.strftime(UTC, time.gmtime(started))),
        ("machine", run.get("machine", "?")),
        ("wall time", f"{_num(None if wall is None else wall / 60)} min"),
        ("quick mode", "yes" if run.get("quick") else "no"),
        ("arms", f"{arms or '?'}; control: {run.get('control', '?')}"),
        ("sessions", f"{n:,}" if isinstance(n, int) else "?"),
        ("data", run.get("data", "?")),
        ("seed checkpoint", run.get("seed_checkpoint", "?")),
        ("DPO fraction", _pct(run.get("dpo_fraction"), signed=False)),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return f"<h1>recloop experiment report: {_e(run.get('run_id', '?'))}</h1><dl>{dl}</dl>"


def _version_table(summary: dict) -> str:
    keys = ("version", "status", "reason")
    rows = [
        [arm, _num(r.get("round"), "d"), *(r.get(k) or "—" for k in keys)]
        for arm, vs in (summary.get("versions") or {}).items()
        for r in vs
    ]
    if not rows:
        return '<p class="nodata">no data: no model versions were recorded</p>'
    return _table(["arm", "round", "version", "status", "reason"], rows)


def render_report(summary: dict, out_dir: Path) -> dict:
    """Writes out_dir/report.html and out_dir/figures/*.png; returns
    {"html": str path, "figures": [{"id", "file", "title", "reading"}]}.

    ``file`` is the PNG's path, or None where the figure had no data (its ``reading`` is
    then "no data: <why>"). Figures are drawn from ``summary`` alone."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures, blocks = [], []
    for fid, title, draw in FIGURES:
        png = fig_dir / f"{fid}.png"
        try:
            fig, reading = draw(summary)
        except NoData as exc:
            fig, reading = None, f"no data: {exc}"
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
            plt.close("all")
            fig, reading = None, f"no data: the section is malformed ({type(exc).__name__}: {exc})"
        if fig is not None:
            fig.suptitle(title)
            fig.tight_layout()
            fig.savefig(png, dpi=100)
            plt.close(fig)
            body = (
                f'<img src="figures/{_e(fid)}.png" alt="{_e(title)}">'
                f'<p class="reading">{_e(reading)}</p>'
            )
        else:
            png.unlink(missing_ok=True)  # no stale figure from an earlier render
            body = f'<p class="nodata">{_e(reading)}</p>'
        file = str(png) if fig is not None else None
        figures.append({"id": fid, "file": file, "title": title, "reading": reading})
        blocks.append(f'<section id="{_e(fid)}"><h3>{_e(title)}</h3>{body}</section>')
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>recloop report {_e((summary.get('run') or {}).get('run_id', ''))}</title>"
        f"<style>{CSS}</style></head><body>{_header(summary)}"
        f'<p class="headline">{_e(summary.get("headline") or "no headline")}</p>'
        f"<h2>Verdict</h2>{_verdict_table(summary)}<h2>Figures</h2>{''.join(blocks)}"
        f"<h2>Model versions</h2>{_version_table(summary)}</body></html>\n"
    )
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {"html": str(html_path), "figures": figures}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.analysis.report SUMMARY.json [--out DIR]``: re-render a saved
    summary."""
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.analysis.report", description=__doc__.splitlines()[0]
    )
    ap.add_argument("summary", type=Path, help="the demo's JSON summary")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: its folder)")
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    result = render_report(summary, args.out or args.summary.parent)
    print(result["html"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
