"""Serving's public API: what the other floors (the CLI, the jobs of ``pipelines/``, the
simulation driver in ``actors/``) do to the service. Everything else in ``serving/`` is
internal to it.

    serve_up           deploy the service (its arms get their models first: ``ensure_arms``)
    ensure_arms        every arm of the experiment has a version in the registry
    latest_seed        the newest pre-trained seed checkpoint
    promote, rollback  change an arm's version and hot-swap the replicas
    service_deployed   whether the service runs on the stack's Serve
    arms_report        the registry's view of the arms, and the live one
    dashboard_url      where the live dashboard answers

A promotion is two steps: the registry (``recloop.registry``, the ground floor's) records
the arm's new version (the source of truth, written atomically), then the application is
redeployed with that version in the arm's ``user_config``. Serve applies a changed
``user_config`` to running replicas in place (``Recommender.reconfigure``): no replica
restarts, no request dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recloop.config import PROJECT_ROOT, StackConfig
from recloop.registry import open_registry

Progress = Callable[[str], None]

__all__ = [
    "arms_report",
    "dashboard_url",
    "ensure_arms",
    "latest_seed",
    "print_json",
    "promote",
    "rollback",
    "serve_up",
    "service_deployed",
    "verify_version",
]


def latest_seed(cfg: StackConfig) -> Path | None:
    """The newest checkpoint written by ``recloop pretrain`` (this home, then the repo's)."""
    for root in (cfg.home / "models" / "seed", PROJECT_ROOT / ".recloop" / "models" / "seed"):
        if root.is_dir():
            found = sorted(
                (p for p in root.iterdir() if (p / "config.json").exists()),
                key=lambda p: p.stat().st_mtime,
            )
            if found:
                return found[-1]
    return None


def ensure_arms(cfg: StackConfig, seed: Path | None = None, progress: Progress = print) -> dict:
    """Every arm of the experiment exists in the registry and has a version: an arm
    without one gets the seed checkpoint (published once into its lineage)."""
    from recloop.experiment import load_experiment

    reg = open_registry(cfg)
    experiment = load_experiment(cfg.serve.experiment)
    published: dict[str, str] = {}
    for spec in experiment.arms:
        reg.create_arm(spec.name, spec.lineage)
        if reg.current(spec.name) is not None:
            continue
        if spec.lineage not in published:
            if spec.model == "seed":
                source = seed or latest_seed(cfg)
            else:
                source = baseline_checkpoint(cfg, spec.model, progress)
            if source is None:
                raise FileNotFoundError(
                    f"arm {spec.name!r} has no model and no seed checkpoint was found: run "
                    "`recloop pretrain` first, or pass --seed DIR"
                )
            versions = reg.versions(spec.lineage)
            published[spec.lineage] = (
                versions[-1]
                if versions
                else reg.publish(spec.lineage, source, metrics={"source": str(source)})
            )
            progress(f"published {source.name} as {spec.lineage}/{published[spec.lineage]}")
        reg.promote(spec.name, published[spec.lineage])
        progress(f"arm {spec.name}: serving {published[spec.lineage]}")
    return reg.arms()


def baseline_checkpoint(cfg: StackConfig, kind: str, progress: Progress = print) -> Path:
    """A ``popularity`` or ``random`` checkpoint over the configured data's items (built
    once per data source under ``<home>/models/baseline``)."""
    import hashlib

    import torch

    from recloop.checkpoint import save_baseline
    from recloop.data import load

    data = load(cfg.data)
    tag = hashlib.sha256(data.source.encode()).hexdigest()[:8]
    path = cfg.home / "models" / "baseline" / f"{kind}-{tag}"
    if (path / "config.json").exists():
        return path
    item_ids = sorted(int(i) for i in data.items["item_id"])
    if kind == "popularity":
        counts = data.ratings["item_id"].value_counts()
        scores = torch.tensor([float(counts.get(i, 0)) for i in item_ids])
    else:  # random: scores are not used
        scores = torch.zeros(len(item_ids))
    save_baseline(path, kind, item_ids, scores, meta={"data": data.source})
    progress(f"built the {kind} baseline over {len(item_ids)} items ({data.source})")
    return path


def serve_up(cfg: StackConfig, seed: Path | None = None, progress: Progress = print) -> None:
    from serving.app import deploy

    ensure_arms(cfg, seed, progress)
    progress("deploying the recommendation service (first start loads the models)")
    deploy(cfg)
    progress(f"serving on http://{cfg.ray.host}:{cfg.ray.serve_port}/recommend (docs: /docs)")


def service_deployed(cfg: StackConfig) -> bool:
    """Whether the service is deployed on the stack's Serve (False when Serve does not
    answer)."""
    try:
        from serving.app import app_status

        return bool(app_status(cfg))
    except Exception:
        return False


def _redeploy(cfg: StackConfig, progress: Progress) -> None:
    from serving.app import deploy

    deploy(cfg)
    progress("replicas reconfigured")


def verify_version(cfg: StackConfig, arm: str, version: str) -> None:
    """Refuse a version whose files no longer match what was published (sha256, size) or
    whose weights do not load: RegistryError / CheckpointError with the reason."""
    import tempfile

    from recloop.checkpoint import validate_checkpoint

    reg = open_registry(cfg)
    with tempfile.TemporaryDirectory(prefix="recloop-verify-") as tmp:
        validate_checkpoint(reg.fetch(reg.arm(arm)["lineage"], version, cache_dir=tmp))


@contextlib.contextmanager
def promotion_lock(cfg: StackConfig) -> Iterator[None]:
    """One promotion at a time on the stack. A promotion redeploys the whole service
    from the registry and waits until every deployment runs that config: two at once
    (each arm's trainer promotes on its own) would deploy a registry read from before
    the other's promotion, putting that arm back, and wait for a config the other
    replaced (until the timeout)."""
    path = cfg.home / "registry.promote.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def promote(cfg: StackConfig, arm: str, version: str, progress: Progress = print) -> dict:
    """Make ``version`` current for ``arm`` and reconfigure the replicas; a version that
    fails ``verify_version`` is refused and nothing changes. (Replicas verify again when
    they load, so a version corrupted after this check is not served either.)"""
    verify_version(cfg, arm, version)
    with promotion_lock(cfg):
        record = open_registry(cfg).promote(arm, version)
        progress(f"arm {arm}: {version} is current; reconfiguring replicas")
        _redeploy(cfg, progress)
    return record


def rollback(cfg: StackConfig, arm: str, progress: Progress = print) -> dict:
    with promotion_lock(cfg):
        record = open_registry(cfg).rollback(arm)
        progress(f"arm {arm}: back to {record['current']}; reconfiguring replicas")
        _redeploy(cfg, progress)
    return record


def arms_report(cfg: StackConfig) -> dict[str, Any]:
    """Registry view (and the live one from ``GET /arms`` when the service answers)."""
    import requests

    from recloop.experiment import load_experiment

    experiment = load_experiment(cfg.serve.experiment)
    reg = open_registry(cfg)
    known = reg.arms()
    out: dict[str, Any] = {"experiment": experiment.name, "arms": {}}
    for spec in experiment.arms:
        rec = known.get(spec.name, {})
        out["arms"][spec.name] = {
            "share": spec.share,
            "lineage": spec.lineage,
            "current": rec.get("current"),
            "versions": reg.versions(spec.lineage),
            "history": rec.get("history", [])[-5:],
        }
    try:
        url = f"http://{cfg.ray.host}:{cfg.ray.serve_port}/arms"
        live = requests.get(url, timeout=5).json()
        for a in live:
            out["arms"].setdefault(a["arm"], {})["serving"] = a["model_version"]
    except Exception:
        out["live"] = "service not answering"
    return out


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def dashboard_url(cfg: StackConfig) -> str:
    """The live dashboard's URL (``serving.dashboard``, deployed with the service)."""
    from serving.dashboard import ROUTE

    return f"http://{cfg.ray.host}:{cfg.ray.serve_port}{ROUTE}"
