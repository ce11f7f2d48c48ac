"""The actors' public API: what the other floors (the demo and analysis jobs of
``pipelines/``, the CLI) start, stop and read of the long-lived actors. Everything else
in ``actors/`` is internal to it.

    ingestors     start_ingestors, stop_ingestors, ingestor_status   (actors.ingestor)
    DPO sampler   start_sampler, stop_sampler, sampler_stats         (actors.dpo_sampler)
    traffic       simulate, load_run, resolve_run                    (actors.sim)

Each function imports its module when called, so importing this one is cheap (the DPO
sampler's module loads torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import StackConfig

if TYPE_CHECKING:
    from actors.sim.runfile import RunFile

Progress = Callable[[str], None]

__all__ = [
    "ingestor_status",
    "load_run",
    "resolve_run",
    "sampler_stats",
    "simulate",
    "start_ingestors",
    "start_sampler",
    "stop_ingestors",
    "stop_sampler",
]


# --------------------------------------------------------------------------- ingestors
def start_ingestors(cfg: StackConfig, say: Progress = print) -> list[Any]:
    """Start ``ingest.consumers`` detached ingestor actors (idempotent)."""
    from actors.ingestor import start_actors

    return start_actors(cfg, say)


def stop_ingestors(cfg: StackConfig, say: Progress = print) -> int:
    """Stop the stack's ingestor actors; how many there were."""
    from actors.ingestor import stop_actors

    return stop_actors(cfg, say)


def ingestor_status(cfg: StackConfig) -> dict[str, Any]:
    """Each running ingestor actor's metrics (lag, records/s, freshness) and the lake."""
    from actors.ingestor import status

    return status(cfg)


# --------------------------------------------------------------------------- DPO sampler
def start_sampler(
    cfg: StackConfig, arms: Sequence[str] | None = None, say: Progress = print
) -> Any:
    """Start the detached DPO sample server ``serve.dpo_actor`` (idempotent)."""
    from actors.dpo_sampler import start_sampler as start

    return start(cfg, arms, say)


def sampler_stats(cfg: StackConfig) -> dict | None:
    """The running sampler's counters (None when none runs)."""
    from actors.dpo_sampler import sampler_stats as stats

    return stats(cfg)


def stop_sampler(cfg: StackConfig, say: Progress = print) -> dict | None:
    """Stop the sampler; its final counters (None when none ran)."""
    from actors.dpo_sampler import stop_sampler as stop

    return stop(cfg, say)


# --------------------------------------------------------------------------- traffic
def simulate(
    cfg: StackConfig,
    run_path: str | Path,
    say: Progress = print,
    deploy: bool = True,
    overrides: dict[str, Any] | None = None,
    learn: bool = True,
) -> dict[str, Any]:
    """Drive a run file's simulated traffic through the running stack (training its
    learning arms meanwhile, with ``learn``); the run's manifest."""
    from actors.sim.driver import simulate as run

    return run(cfg, run_path, say, deploy, overrides, learn)


def load_run(path: str | Path, simulation: dict[str, Any] | None = None) -> RunFile:
    """A run file, validated; ``simulation`` overrides keys of its ``simulation:``."""
    from actors.sim.runfile import load_run as load

    return load(path, simulation)


def resolve_run(cfg: StackConfig, run: str | None) -> Path:
    """A simulation run's folder, from a run id, a path, or None / 'latest'."""
    from actors.sim.driver import resolve_run as resolve

    return resolve(cfg, run)
