"""A round: its data, training, publication, the gate and promotion, each phase recorded
in the state so a round killed anywhere resumes where it stopped."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.continuous import recount
from pipelines.continuous.data import (
    POLL_COLUMNS,
    SessionExamples,
    _entries_by_key,
    _newest,
    _read_sessions,
    policy_sessions,
    policy_weights,
    quality_sessions,
    round_context,
    select_entries,
)
from pipelines.continuous.dataset import RoundQuery, round_data
from pipelines.continuous.state import (
    FAULT_ENV,
    KEEP_ROUND_DIRS,
    KEEP_STATE_ROUNDS,
    SEED,
    Progress,
    PromoteFn,
    _arm_lock,
    _now_ms,
    round_dir,
)
from pipelines.continuous.trainer import Trainer, WarmTrainer, ray_train, worker_conf
from recloop.config import StackConfig
from recloop.lake import Lake
from recloop.registry import RegistryError, open_registry
from recloop.train_state import append_round, load_state, plain, save_state, train_dir


# --------------------------------------------------------------------------- promotion
def promote_serving(cfg: StackConfig, arm: str, version: str, progress: Progress = print) -> Any:
    """Registry promote, then a Serve redeploy (hot swap) when the service is deployed;
    with no service deployed the registry is the whole truth (a later ``recloop serve``
    deploys the current version)."""
    from serving import api

    if api.service_deployed(cfg):
        return api.promote(cfg, arm, version, progress)
    record = open_registry(cfg).promote(arm, version)
    progress(f"arm {arm}: {version} is current (no service deployed: registry only)")
    return record


def promote_registry(cfg: StackConfig, arm: str, version: str, progress: Progress = print) -> Any:
    """Registry-only promotion (no Serve redeploy): for tests and offline use."""
    record = open_registry(cfg).promote(arm, version)
    progress(f"arm {arm}: {version} is current (registry)")
    return record


# --------------------------------------------------------------------------- a round


def _base(cfg: StackConfig, reg, arm: str) -> tuple[str, str]:
    lineage = reg.arm(arm)["lineage"]
    version = reg.current(arm)
    if version is None:
        raise RuntimeError(
            f"arm {arm!r} serves no version yet: promote a seed first (recloop serve / promote)"
        )
    return lineage, version


def _complete(cfg: StackConfig, state: dict, record: dict, marks: dict) -> dict:
    """Record the round and advance the marks, in one atomic state write."""
    append_round(cfg, record)
    state["marks"] = marks
    if record.get("pref_offsets") is not None:  # the round's pairs are consumed with it
        state["pref_offsets"] = record["pref_offsets"]
    if record.get("round") is not None:
        state["round"] = record["round"]
    state["in_progress"] = None
    state["rounds"] = (state.get("rounds", []) + [plain(record)])[-KEEP_STATE_ROUNDS:]
    save_state(cfg, state)
    return record


def _cleanup(cfg: StackConfig, ip: dict) -> None:
    shutil.rmtree(train_dir(cfg) / "ray" / ip["run"], ignore_errors=True)
    shutil.rmtree(train_dir(cfg) / "local" / ip["run"], ignore_errors=True)
    shutil.rmtree(round_dir(cfg, ip["round"]) / "candidate", ignore_errors=True)
    rounds = sorted((train_dir(cfg) / "rounds").glob("r*"))
    for old in rounds[:-KEEP_ROUND_DIRS]:
        shutil.rmtree(old, ignore_errors=True)


def _fault_from_env() -> dict | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    action, _, step = spec.partition(":")
    return {"action": action, "after_step": int(step or 1)}


def run_round(
    cfg: StackConfig,
    progress: Progress = print,
    policy: str = "own-arm",
    promote: PromoteFn | None = None,
    trainer: Trainer | None = None,
) -> dict | None:
    """One round (see the module docstring), or the round in progress resumed. Returns
    the round's record, or None when there is not enough new data yet. ``policy``: the
    data policy (``recloop.examples.DATA_POLICIES``).

    ``promote(cfg, arm, version, progress)`` defaults to ``promote_serving`` (registry +
    Serve hot swap when the service is deployed); ``trainer(cfg, conf, run_name,
    workers)`` to ``default_trainer(cfg)`` (a ``WarmTrainer`` with one worker, Ray Train
    DDP with more): pass the same ``WarmTrainer`` round after round to keep it warm."""
    # The driver's own torch work (reward model, reference log p, the gate) on
    # train.torch_threads: torch's default of every core spins on a shared 2-core machine.
    torch.set_num_threads(cfg.train.torch_threads)
    with _arm_lock(cfg):
        if recount.serves_popularity(cfg):  # a popularity arm: its counts follow the clicks
            return recount.recount_round(cfg, progress, policy, promote or promote_serving)
        return _run_round(
            cfg, progress, policy, promote or promote_serving, trainer or default_trainer(cfg)
        )


def default_trainer(cfg: StackConfig) -> Trainer:
    """One worker: the in-process ``WarmTrainer`` (on one machine it trains ~1.6x the
    examples/s of two DDP workers and starts in no time); more: a Ray Train job of
    ``train.workers`` DDP workers per round (a cluster's train nodes)."""
    return WarmTrainer(cfg) if cfg.train.workers <= 1 else ray_train


@contextlib.contextmanager
def _machine_lock(cfg: StackConfig, progress: Progress) -> Iterator[None]:
    """Rounds of different arms on one machine take turns (``train.exclusive_rounds``):
    two at once would only slow each other and the serving replicas down."""
    if not cfg.train.exclusive_rounds:
        yield
        return
    path = cfg.home / "train" / ".rounds.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            progress(f"waited {time.monotonic() - t0:.1f} s for another arm's round")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Phases:
    """Seconds spent per phase of a round (data, train, publish, gate, promote), kept in
    the round in progress so a resumed round adds to what it had."""

    def __init__(self, ip: dict) -> None:
        self.d = ip.setdefault("phases", {})

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.d[name] = round(self.d.get(name, 0.0) + time.monotonic() - t0, 4)


# (home, arm) -> (high-quality sessions last reported waiting, when)
_waiting: dict[tuple[str, str], tuple[int, float]] = {}


def _run_round(
    cfg: StackConfig, progress: Progress, policy: str, promote: PromoteFn, trainer: Trainer
) -> dict | None:
    tc, arm = cfg.train, cfg.train.arm
    warm = trainer if isinstance(trainer, WarmTrainer) else None
    state = load_state(cfg)
    if warm is not None and warm.lake is None:
        warm.lake = Lake(cfg.lake_dir)  # keeps the commit log it parsed between polls
    lake = warm.lake if warm is not None else Lake(cfg.lake_dir)
    reg = open_registry(cfg)
    ip = state.get("in_progress")
    t_data = time.monotonic()
    if ip is None:
        new = lake.new_entries(state["marks"])
        if warm is not None:  # hold the version serving before the round needs it
            warm.prefetch(reg, arm, progress)
            warm.warm_data(progress)
        if not new:
            return None
        entries, capped = select_entries(new, tc.max_sessions)
        cache = warm.sessions if warm is not None else None
        rows = _read_sessions(lake, entries, cache, POLL_COLUMNS)
        mine = policy_sessions(rows, arm, policy)
        weights = policy_weights(rows, policy)
        hq = quality_sessions(mine, tc.min_clicks, tc.min_watch_s)
        marks_after = Lake.advance(state["marks"], entries)
        if len(hq) < tc.min_sessions and not capped:
            said, at = _waiting.get((str(cfg.home), arm), (-1, -1e9))
            if len(hq) != said and time.monotonic() - at >= 10.0:  # polls are ~1 s apart
                _waiting[(str(cfg.home), arm)] = (len(hq), time.monotonic())
                progress(
                    f"waiting for data: {len(hq)} high-quality sessions of {tc.min_sessions} "
                    f"({len(rows)} sessions in {len(entries)} new commits)"
                )
            return None
        lineage, base_version = _base(cfg, reg, arm)
        base, base_dir = _load_base(cfg, reg, warm, lineage, base_version)
        item_ids = base.meta.get("item_ids") or list(range(1, base.tokenizer.num_items + 1))
        mc = base.model.cfg
        t_read = time.monotonic()
        query = RoundQuery(
            arm=arm,
            policy=policy,
            min_clicks=tc.min_clicks,
            min_watch_s=tc.min_watch_s,
            item_ids=item_ids,
            max_history=mc.max_history,
            session_len=mc.session_len,
            holdout_fraction=tc.holdout_fraction,
            context=(lambda hq: round_context(cfg, base, hq, progress))
            if mc.context_width
            else None,
            policy_rows=tc.dpo,
            weights=weights,
        )
        data = round_data(
            lake,
            entries,
            query,
            data_engine=tc.data_engine,
            cpus=tc.data_cpus,
            resources=tc.worker_resources,
            tasks=tc.data_tasks,
            timeout_s=tc.data_timeout_s,
        )
        if data.fallback:
            progress(f"read the round in process: {data.fallback}")
        ex = data.examples
        n_train = int((~ex.holdout).sum())
        info = {
            "data_engine": data.engine,
            "data_fallback": data.fallback,
            "data_read_s": round(time.monotonic() - t_read, 4),
            "sessions": len(rows),
            "policy_sessions": len(mine),
            "hq_sessions": len(hq),
            "examples": len(ex),
            "train_examples": n_train,
            "holdout_examples": len(ex) - n_train,
            "newest_event_ms": _newest(rows, "event_time_ms"),
            "newest_feedback_ms": _newest(rows, "last_feedback_ms"),
            "newest_record_ts_ms": _newest(rows, "record_ts_ms"),
            "commits": len(entries),
            "capped": capped,
            "data_policy": policy,
            "arm_weights": weights,
        }
        if n_train < 1 or len(ex) - n_train < 1:  # nothing to train on, or to gate with
            progress(
                f"consuming {len(entries)} commits without training: {len(ex)} usable "
                f"examples in {len(rows)} sessions ({len(hq)} high quality)"
            )
            record = {
                "round": None,
                "arm": arm,
                "status": "skipped",
                "lake_marks": marks_after,
                "completed_at_ms": _now_ms(),
                **info,
            }
            return _complete(cfg, state, record, marks_after)
        round_no = int(state["round"]) + 1
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        run = f"r{round_no:05d}-{stamp}"
        pref_after = None
        if tc.dpo:  # IPA: the reward model, then the pairs its sampler mined
            from pipelines.alignment.ipa import round_inputs

            pairs, pref_after, reward = round_inputs(
                cfg,
                reg,
                state.get("pref_offsets", {}),
                data.policy_rows,
                item_ids,
                mc,
                round_no,
                lineage,
                train_dir(cfg),
                progress,
                reference=warm.reference(reg, lineage) if warm is not None else None,
            )
            pairs.save(round_dir(cfg, round_no) / "pairs.safetensors")
            info["pairs"], info["reward_model"] = pairs.info, reward
        ex.save(round_dir(cfg, round_no) / "examples.safetensors", {"round": round_no, **info})
        ip = {
            "round": round_no,
            "run": run,
            "version": f"{arm[:40]}-r{round_no:05d}-{stamp}",
            "entries": [[e.writer, e.seq] for e in entries],
            "marks_after": marks_after,
            "pref_offsets_after": pref_after,
            "lineage": lineage,
            "base_version": base_version,
            "phase": "training",
            "started_at_ms": _now_ms(),
            "train_s": 0.0,
            "attempts": 0,
            "info": info,
            "phases": {"data": round(time.monotonic() - t_data, 4)},
            # fixed for the round: a resume must replay the same batches and steps
            "plan": {
                "workers": max(1, min(tc.workers, n_train)),
                "epochs": tc.epochs,
                "batch_size": tc.batch_size,
                "lr": tc.lr,
                "checkpoint_every_steps": tc.checkpoint_every_steps,
                "reward_weighting": tc.reward_weighting,
                "seed": SEED,
            },
        }
        state["in_progress"] = ip
        save_state(cfg, state)
        progress(
            f"round {round_no}: {info['hq_sessions']} high-quality sessions of "
            f"{info['sessions']} in {len(entries)} commits -> {len(ex)} examples "
            f"({n_train} train, {info['holdout_examples']} held out); base {base_version}"
        )
    else:
        progress(f"resuming round {ip['round']} ({ip['run']}, phase {ip['phase']})")
        _entries_by_key(lake, ip["entries"])  # the round's data must still be there
        base, base_dir = _load_base(cfg, reg, warm, ip["lineage"], ip["base_version"])
        item_ids = base.meta.get("item_ids") or list(range(1, base.tokenizer.num_items + 1))
        ex = SessionExamples.load(round_dir(cfg, ip["round"]) / "examples.safetensors")
    with _machine_lock(cfg, progress):
        return _finish_round(
            cfg, state, ip, ex, base, base_dir, item_ids, progress, promote, trainer
        )


def _load_base(cfg: StackConfig, reg, warm: WarmTrainer | None, lineage: str, version: str):
    """(Checkpoint, directory) of the round's base: from the warm trainer's memory when
    it holds it, else read from the registry."""
    if warm is not None:
        return warm.checkpoint(reg, lineage, version)
    from recloop.checkpoint import load_checkpoint

    base_dir = reg.fetch(lineage, version, cache_dir=train_dir(cfg) / "cache")
    return load_checkpoint(base_dir), base_dir


def _round_pairs(cfg: StackConfig, ip: dict):
    """The round's preference pairs (IPA rounds), None otherwise."""
    path = round_dir(cfg, ip["round"]) / "pairs.safetensors"
    if ip.get("pref_offsets_after") is None or not path.exists():
        return None
    from pipelines.alignment.ipa import PairSet

    return PairSet.load(path)


def _finish_round(cfg, state, ip, ex, base, base_dir, item_ids, progress, promote, trainer) -> dict:
    from pipelines.continuous.gate import GateResult, gate
    from recloop.checkpoint import save_checkpoint

    tc, arm, reg = cfg.train, cfg.train.arm, open_registry(cfg)
    rdir = round_dir(cfg, ip["round"])
    cand_dir = rdir / "candidate"
    info = ip["info"]
    h_train, t_train = ex.train_part()
    plan = ip["plan"]
    workers, epochs = int(plan["workers"]), int(plan["epochs"])
    phase = _Phases(ip)
    in_memory = None
    if ip["phase"] == "training":
        if trainer is ray_train:
            from recloop.ray_head import connect

            connect(cfg)
        c_train = None if ex.context is None else ex.context[~ex.holdout]
        conf = worker_conf(
            cfg,
            ip["round"],
            plan,
            ip["lineage"],
            ip["base_version"],
            h_train,
            t_train,
            c_train,
            ex.target_weights(plan.get("reward_weighting", "none")),
        )
        conf["fault"] = _fault_from_env()
        pairs = _round_pairs(cfg, ip)
        if pairs is not None and len(pairs):
            conf["pairs"] = pairs.tensors()
            conf["dpo_beta"], conf["dpo_weight"] = cfg.dpo.beta, cfg.dpo.weight
        ip["attempts"] = int(ip.get("attempts", 0)) + 1
        save_state(cfg, state)
        t0 = time.monotonic()
        try:
            with phase("train"):
                out = trainer(cfg, conf, ip["run"], workers)
        finally:
            ip["train_s"] = float(ip.get("train_s", 0.0)) + time.monotonic() - t0
            save_state(cfg, state)
        st, trained = out["state"], out["trained"]
        if len(trained) != len(t_train) or not bool((trained == epochs).all()):
            raise RuntimeError(
                f"round {ip['round']}: training passes per example are "
                f"{sorted(set(trained.tolist()))}, expected exactly {epochs}"
            )
        n_pairs = len(conf.get("pairs", {}).get("chosen", ()))
        pair_passes = out.get("pairs_trained")
        if n_pairs and (pair_passes is None or not bool((pair_passes == epochs).all())):
            raise RuntimeError(
                f"round {ip['round']}: training passes per preference pair are "
                f"{None if pair_passes is None else sorted(set(pair_passes.tolist()))}, "
                f"expected exactly {epochs}"
            )
        t_cand = time.monotonic()
        model = copy.deepcopy(base.model)  # the base may be the warm trainer's, shared
        model.load_state_dict(out["weights"], strict=True)
        shutil.rmtree(cand_dir, ignore_errors=True)
        meta = {
            "version": ip["version"],
            "item_ids": [int(i) for i in item_ids],
            "data": base.meta.get("data"),
            "train": base.meta.get("train"),
            "source": "continuous",
            "arm": arm,
            "round": ip["round"],
            "base_version": ip["base_version"],
            "lineage": ip["lineage"],
            "lake_marks": ip["marks_after"],
            "lake_entries": ip["entries"],
            "newest_event_ms": info["newest_event_ms"],
            "newest_feedback_ms": info["newest_feedback_ms"],
            "newest_record_ts_ms": info["newest_record_ts_ms"],
            "sessions": info["sessions"],
            "hq_sessions": info["hq_sessions"],
            "examples": info["examples"],
            "train_examples": info["train_examples"],
            "holdout_examples": info["holdout_examples"],
            # a round begun before data policies were named recorded "pooled" instead
            "data_policy": info.get("data_policy")
            or ("pooled" if info.get("pooled") else "own-arm"),
            "arm_weights": info.get("arm_weights"),
            "history": st["epochs"],
            "attempts": st["attempts"],
        }
        if base.meta.get("context"):  # the same rows are built for it in serving
            meta["context"] = base.meta["context"]
        save_checkpoint(cand_dir, model, base.tokenizer, plain(meta))
        phase.d["candidate"] = round(time.monotonic() - t_cand, 4)
        in_memory = (model, meta)  # the candidate, for a warm trainer to hold once published
        ip["training"] = {
            "epochs": st["epochs"],
            "attempts": st["attempts"],
            "global_steps": st["global_step"],
            "trained_examples": int(trained.sum()),
            "trained_pairs": n_pairs,
            "workers": workers,
        }
        ip["phase"] = "trained"
        save_state(cfg, state)
        losses = [round(e["ntp_loss"], 4) for e in st["epochs"]]
        progress(
            f"round {ip['round']}: trained {int(trained.sum())} example passes in "
            f"{ip['train_s']:.1f} s on {workers} workers; ntp loss by epoch {losses}"
        )

    if ip["phase"] == "trained":
        t_pub = time.monotonic()
        metrics = plain(
            {
                "source": "continuous",
                "arm": arm,
                "round": ip["round"],
                "base_version": ip["base_version"],
                "lake_marks": ip["marks_after"],
                **info,
                "training": ip["training"],
                "train_s": ip["train_s"],
            }
        )
        if ip["version"] in reg.versions(ip["lineage"]):
            pass  # published before a crash: write-once, keep it
        else:
            try:
                reg.publish(ip["lineage"], cand_dir, version=ip["version"], metrics=metrics)
            except RegistryError as exc:  # refused (non-finite weights...): never served
                ip["gate"] = GateResult(False, f"publish refused: {exc}"[:2000]).to_json()
                ip["published"] = False
                ip["phase"] = "gated"
                save_state(cfg, state)
        if ip["phase"] == "trained":
            ip["published"] = True
            ip["phase"] = "published"
            save_state(cfg, state)
            progress(f"round {ip['round']}: published {ip['lineage']}/{ip['version']}")
            if isinstance(trainer, WarmTrainer) and in_memory is not None:
                from recloop.checkpoint import Checkpoint

                path = reg.fetch(ip["lineage"], ip["version"], cache_dir=train_dir(cfg) / "cache")
                ck = Checkpoint(in_memory[0], base.tokenizer, plain(in_memory[1]), Path(path))
                trainer.adopt(ip["lineage"], ip["version"], ck, path)
        phase.d["publish"] = round(phase.d.get("publish", 0.0) + time.monotonic() - t_pub, 4)

    if ip["phase"] == "published":
        with phase("gate"):
            cand = reg.fetch(ip["lineage"], ip["version"], cache_dir=train_dir(cfg) / "cache")
            holdout = ex.holdout_raw(item_ids)
            result = gate(cand, base_dir, holdout, tc.tolerance)
        ip["gate"] = result.to_json()
        ip["phase"] = "gated"
        save_state(cfg, state)
        progress(
            f"round {ip['round']}: gate {'passed' if result.passed else 'REJECTED'}: "
            f"{result.reason}"
        )

    if ip["phase"] == "gated":
        if ip["gate"]["passed"]:
            with phase("promote"):
                promote(cfg, arm, ip["version"], progress)
            ip["status"] = "promoted"
        else:
            ip["status"] = "rejected"
        ip["phase"] = "decided"
        save_state(cfg, state)

    now = _now_ms()
    tr = ip.get("training", {})
    passes = tr.get("trained_examples", 0)
    compute_s = sum(a.get("compute_s", 0.0) for a in tr.get("attempts", []))
    record = {
        "round": ip["round"],
        "run": ip["run"],
        "arm": arm,
        "status": ip["status"],
        "version": ip["version"] if ip.get("published") else None,
        "base_version": ip["base_version"],
        "lineage": ip["lineage"],
        "lake_marks": ip["marks_after"],
        "pref_offsets": ip.get("pref_offsets_after"),
        "commits": len(ip["entries"]),
        **info,
        "epochs": epochs,
        "trained_pairs": tr.get("trained_pairs", 0),
        "trained_examples": passes,
        "examples_per_s": passes / ip["train_s"] if ip["train_s"] > 0 else None,
        "compute_examples_per_s": passes / compute_s if compute_s > 0 else None,
        "train_s": ip["train_s"],
        "round_s": (now - ip["started_at_ms"]) / 1000,
        "phases": ip.get("phases", {}),
        "losses": tr.get("epochs", []),
        "attempts": tr.get("attempts", []),
        "resumed_from_step": max(
            (a["start_global_step"] for a in tr.get("attempts", [])), default=0
        ),
        "workers": tr.get("workers"),
        "gate": ip["gate"],
        "promoted": ip["status"] == "promoted",
        "completed_at_ms": now,
    }
    _complete(cfg, state, record, ip["marks_after"])
    _cleanup(cfg, ip)
    g = ip["gate"]
    progress(
        f"round {ip['round']} {ip['status']}: {record['version']} "
        f"({record['examples']} examples, {passes} passes, "
        f"{record['examples_per_s'] or 0:.0f} ex/s, {record['round_s']:.1f} s); {g['reason']}"
    )
    return record
