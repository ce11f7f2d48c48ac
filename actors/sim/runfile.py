"""The run file of a simulated A/B test: one YAML describes the whole experiment.

    experiment:   the serving side (``recloop.experiment``): arms, shares, salt, what each
                  arm starts from (``model``), how it learns (``learning``), data policy
    simulation:   the users: seed, population, virtual duration, arrival rate, speed-up,
                  concurrency (``SimulationConfig``)
    analysis:     the statistics: control arm, alpha, design, horizon (``AnalysisConfig``)
    stack:        optional: the stack config (``recloop.config``), read by ``--config``

Unknown keys are an error in every section. ``infra/experiments/`` holds the ready ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recloop.config import PROJECT_ROOT

EXPERIMENTS_DIR = PROJECT_ROOT / "infra" / "experiments"


@dataclass
class SimulationConfig:
    """How the simulated users behave as traffic (their responses: ``user_model``).

    Each user arrives as a Poisson process on the virtual clock, at a rate proportional
    to the square root of their activity in the data, scaled so the population's mean is
    ``sessions_per_user_day``. ``speedup`` virtual seconds pass per wall second; 0 runs as
    fast as the server answers. The run ends at ``duration_s`` virtual seconds or after
    ``max_sessions`` sessions, whichever comes first.
    """

    seed: int = 0
    users: int | None = None  # a seeded sample of the data's users; None: all of them
    duration_s: float = 6 * 3600.0  # virtual
    max_sessions: int | None = None
    sessions_per_user_day: float = 4.0
    speedup: float = 60.0
    concurrency: int = 16  # requests in flight per shard
    shards: int = 1  # simulator actors; users are split between them
    shard_cpus: float = 0.25
    session_size: int | None = None  # items per session (default: the arm's model M)
    exclude_seen: bool = True
    request_timeout_s: float = 30.0
    oracle: bool = True  # compute the hidden model's best achievable session value
    seed_histories: bool = True  # push real histories to Feast for users without one
    start_ms: int | None = None  # virtual clock at t=0 (default: wall clock at the start)
    user_model: str | None = None  # fitted hidden model dir (default: fitted on first use)
    # The hidden model fitted on first use: "sequential" (the recent watches move the
    # watch head; the default, chosen by held-out fit to MovieLens: make bench-sim-fit)
    # or "static" (taste and fatigue only).
    user_model_kind: str = "sequential"
    progress_every_s: float = 5.0
    # After the traffic: wait up to this long for the learning arms' training rounds in
    # progress to finish (each trainer stops as soon as it is between rounds); 0 stops
    # them at once, aborting a round midway (it resumes when training starts again).
    drain_s: float = 0.0
    # overrides of the hidden model's response settings (actors.sim.user_model's
    # ResponseConfig), e.g. {drift_days: 2, drift_strength: 0.8} for faster taste drift
    response: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from actors.sim.user_model import KINDS, ResponseConfig

        known = {f.name for f in dataclasses.fields(ResponseConfig)}
        if set(self.response) - known:
            raise ValueError(
                f"simulation.response: unknown key(s) {sorted(set(self.response) - known)}"
            )
        ResponseConfig(**self.response)  # the ranges are checked there
        if self.user_model_kind not in KINDS:
            raise ValueError(
                f"simulation.user_model_kind must be one of {KINDS}: {self.user_model_kind!r}"
            )
        checks = [
            (self.duration_s > 0, "duration_s must be > 0"),
            (self.sessions_per_user_day > 0, "sessions_per_user_day must be > 0"),
            (self.speedup >= 0, "speedup must be >= 0 (0: as fast as possible)"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (self.shards >= 1, "shards must be >= 1"),
            (self.shard_cpus > 0, "shard_cpus must be > 0"),
            (self.users is None or self.users >= 1, "users must be >= 1"),
            (self.max_sessions is None or self.max_sessions >= 1, "max_sessions must be >= 1"),
            (
                self.session_size is None or 1 <= self.session_size <= 64,
                "session_size must be within 1..64",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"simulation.{msg}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunFile:
    path: Path
    experiment: Any  # recloop.experiment.Experiment
    simulation: SimulationConfig
    analysis: dict[str, Any] = field(default_factory=dict)  # recloop.ab_stats.AnalysisConfig


def _section(doc: dict, key: str, path: Path) -> dict:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: '{key}:' must be a mapping, got {type(value).__name__}")
    return value


def load_run(path: str | Path, simulation: dict[str, Any] | None = None) -> RunFile:
    """Read and validate a run file; every error names the file and the field.
    ``simulation`` overrides keys of its ``simulation:`` section (CLI flags)."""
    from recloop.experiment import load_experiment

    p = Path(path)
    experiment = load_experiment(p)  # also checks the file exists and is YAML
    doc = yaml.safe_load(p.read_text())
    unknown = set(doc) - {"experiment", "simulation", "analysis", "stack"}
    if unknown:
        raise ValueError(
            f"{p}: unknown top-level key(s) {sorted(unknown)}; expected experiment, "
            "simulation, analysis (and stack, read by --config)"
        )
    sim = {**_section(doc, "simulation", p), **(simulation or {})}
    names = {f.name for f in dataclasses.fields(SimulationConfig)}
    if set(sim) - names:
        raise ValueError(f"{p}: unknown simulation key(s) {sorted(set(sim) - names)}")
    try:
        simulation = SimulationConfig(**sim)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: {exc}") from exc
    analysis = _section(doc, "analysis", p)
    from recloop.ab_stats import AnalysisConfig

    a_names = {f.name for f in dataclasses.fields(AnalysisConfig)}
    if set(analysis) - a_names:
        raise ValueError(f"{p}: unknown analysis key(s) {sorted(set(analysis) - a_names)}")
    analysis.setdefault("control", experiment.arms[0].name)
    if analysis["control"] not in {a.name for a in experiment.arms}:
        raise ValueError(f"{p}: analysis.control {analysis['control']!r} is not an arm")
    return RunFile(p, experiment, simulation, analysis)
