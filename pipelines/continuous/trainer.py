"""The training side of a round: the worker loop (one process or a Ray Train DDP worker),
its checkpoints (safetensors + JSON) for an exact resume, and the trainers that run it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipelines.continuous.state import (
    GRAD_CLIP,
    MAX_WORKER_FAILURES,
    WEIGHT_DECAY,
    _now_ms,
)
from recloop.config import StackConfig
from recloop.train_state import plain, train_dir


# --------------------------------------------------------------------------- worker loop
def epoch_schedule(n: int, world: int, batch_size: int) -> list[tuple[int, int]]:
    """Global batches of an epoch as [lo, hi) slices of its permutation: ``batch_size``
    examples per worker, every worker at least one (a last slice smaller than the world
    joins the one before), so all ranks run the same number of steps."""
    if n < world:
        raise ValueError(f"{n} training examples for {world} workers")
    g = batch_size * world
    out = [(lo, min(lo + g, n)) for lo in range(0, n, g)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < world:
        out[-2:] = [(out[-2][0], n)]
    return out


def _mix(*parts: int | str) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def epoch_permutation(n: int, seed: int, round_no: int, epoch: int, salt: str = "") -> torch.Tensor:
    parts = (seed, round_no, epoch, salt) if salt else (seed, round_no, epoch)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(*parts)))


class InjectedFault(RuntimeError):
    """Raised by the fault injection of the tests (``fault={"action": "raise"}``)."""


class WorkerIO:
    """What the training loop needs from its runtime (Ray Train, or a plain process)."""

    rank = 0
    world = 1

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        return contextlib.nullcontext(None)

    def report(self, metrics: dict, checkpoint_dir: Path | None, name: str) -> None:
        pass

    def committed(self) -> None:
        """Block until every reported checkpoint is registered."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t


class LocalIO(WorkerIO):
    """One process, checkpoints as directories under ``root`` (tests, debugging)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.reports: list[dict] = []

    def latest(self) -> Path | None:
        found = sorted(p for p in self.root.glob("ckpt-*") if p.is_dir())
        return found[-1] if found else None

    def restore(self):
        return contextlib.nullcontext(self.latest())

    def report(self, metrics, checkpoint_dir, name):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / name)


class _RayIO(WorkerIO):
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @contextlib.contextmanager
    def restore(self):
        import ray.train

        ck = ray.train.get_checkpoint()
        if ck is None:
            yield None
        else:
            with ck.as_directory() as d:
                yield Path(d)

    def report(self, metrics, checkpoint_dir, name):
        import ray.train

        ck = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=name)

    def committed(self):
        import ray.train
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def all_reduce(self, t):
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t)
        return t


def _save_optimizer(opt: torch.optim.Optimizer, root: Path) -> None:
    """AdamW state as safetensors (tensors) + JSON (the rest): no pickle."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(root / "optimizer.safetensors"))
    (root / "optimizer.json").write_text(
        json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    )


def _load_optimizer(opt: torch.optim.Optimizer, root: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(root / "optimizer.safetensors"))
    meta = json.loads((root / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train_worker(conf: dict[str, Any], io: WorkerIO, resident: Any = None) -> None:
    """One worker's part of a round's training (Ray Train calls it via ``_ray_worker``;
    the warm trainer in its own process with ``resident`` = (model, code table), a model
    that already holds the base's weights).

    ``conf``: round, seed, epochs, batch_size, lr, weight_decay, torch_threads,
    checkpoint_every_steps, model_dir (the base checkpoint directory; or registry_uri,
    lineage, base_version to fetch it), histories (N, H), targets (N, M), fault; for IPA
    rounds also pairs (``pipelines.alignment.ipa.PairSet.tensors()``), dpo_beta and
    dpo_weight: every step then also trains on its slice of the epoch's shuffled pairs
    with the DPO loss."""
    from safetensors.torch import load_file, save_file

    from models.dpo import NtpDpoObjective
    from models.ranker import code_table
    from recloop.checkpoint import load_checkpoint

    entered = time.monotonic()
    torch.set_num_threads(int(conf.get("torch_threads", 1)))
    rank, world = io.rank, io.world
    if resident is not None:  # the warm trainer's model, already holding the base weights
        model, codes = resident
    else:
        model_dir = conf.get("model_dir")
        if model_dir is None:
            from recloop.registry import ModelRegistry

            reg = ModelRegistry(conf["registry_uri"])
            model_dir = reg.fetch(conf["lineage"], conf["base_version"])
        ck = load_checkpoint(model_dir)
        model, codes = ck.model, code_table(ck.tokenizer, ck.tokenizer.num_items)
    loaded_s = time.monotonic() - entered
    hist, tgt = conf["histories"].long(), conf["targets"].long()
    ctx = conf.get("contexts")  # (N, W) for a model that takes a context
    tw = conf.get("target_weights")  # (N, M) per target item (train.reward_weighting)
    n, epochs, round_no, seed = len(tgt), int(conf["epochs"]), int(conf["round"]), int(conf["seed"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(conf["lr"]), weight_decay=float(conf["weight_decay"])
    )
    trained = torch.zeros(n, dtype=torch.int32)  # training passes per example, all ranks
    pairs = conf.get("pairs") or {}
    n_pairs = len(pairs.get("chosen", ()))
    pairs_trained = torch.zeros(n_pairs, dtype=torch.int32)  # passes per pair, all ranks
    st: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "global_step": 0,
        "epochs": [],
        "attempts": [],
        "acc": dict(_ACC0),
    }
    with io.restore() as restored:
        if restored is not None:
            model.load_state_dict(load_file(str(restored / "model.safetensors")), strict=True)
            _load_optimizer(opt, restored)
            counts = load_file(str(restored / "trained.safetensors"))
            trained = counts["trained"]
            pairs_trained = counts.get("pairs_trained", pairs_trained)
            st = json.loads((restored / "train_state.json").read_text())
            if st.get("examples") != n:
                raise ValueError(f"checkpoint is for {st.get('examples')} examples, not {n}")
    resumed = restored is not None
    st["examples"] = n
    st["attempts"].append(
        {
            "start_global_step": st["global_step"],
            "epoch": st["epoch"],
            "step": st["step"],
            "world": world,
            "started_ms": _now_ms(),
        }
    )
    attempt = st["attempts"][-1]  # where this attempt's time goes: setup, steps, reports
    # One forward computes both losses, so DDP sees one forward per backward.
    net: torch.nn.Module = NtpDpoObjective(
        model, float(conf.get("dpo_beta", 0.1)), float(conf.get("dpo_weight", 1.0))
    )
    t_ddp = time.monotonic()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net)  # CPU: gloo, set up by TorchTrainer
    attempt.update(load_s=loaded_s, ddp_s=time.monotonic() - t_ddp)
    every = max(1, int(conf.get("checkpoint_every_steps") or 50))
    fault = conf.get("fault") or {}
    pending = torch.zeros(n, dtype=torch.int32)  # this rank's passes since the last report
    pending_pairs = torch.zeros(n_pairs, dtype=torch.int32)
    sums = torch.zeros(len(_SUMS), dtype=torch.float64)  # see _SUMS (this rank's)
    reported = False
    attempt.update(setup_s=time.monotonic() - entered, compute_s=0.0, report_s=0.0)

    def report(epoch_done: bool) -> None:
        nonlocal pending, pending_pairs, sums, trained, pairs_trained, reported
        t_report = time.monotonic()
        trained += io.all_reduce(pending.clone())
        pending.zero_()
        if n_pairs:
            pairs_trained += io.all_reduce(pending_pairs.clone())
            pending_pairs.zero_()
        red = io.all_reduce(sums.clone()) / world
        sums.zero_()
        acc = st["acc"]
        for k, v in zip(_SUMS, red.tolist(), strict=True):
            acc[k] = acc.get(k, 0.0) + v
        metrics = {
            "round": round_no,
            "epoch": st["epoch"],
            "step": st["step"],
            "global_step": st["global_step"],
            "trained_examples": int(trained.sum()),
            "ntp_loss": float(red[0] / red[3]) if red[3] > 0 else None,
        }
        if epoch_done:
            s, ds = max(1.0, acc["steps"]), acc.get("dpo_steps", 0.0)
            row = {
                "epoch": st["epoch"],
                "ntp_loss": acc["ntp"] / s,
                "moe_aux_loss": acc["moe_aux"] / s,
                "next_item_loss": acc["next_item"] / s,
                "steps": int(round(acc["steps"])),
            }
            if ds > 0:
                row["dpo_loss"] = acc["dpo"] / ds
                row["dpo_accuracy"] = acc["dpo_accuracy"] / ds
            st["epochs"].append(row)
            st["epoch"], st["step"] = st["epoch"] + 1, 0
            st["acc"] = dict(_ACC0)
            metrics["epoch_ntp_loss"] = st["epochs"][-1]["ntp_loss"]
        name = f"ckpt-g{st['global_step']:07d}-a{len(st['attempts']) - 1}"
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="recloop-ckpt-") as tmp:
                root = Path(tmp)
                weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(weights, str(root / "model.safetensors"))
                _save_optimizer(opt, root)
                counts = {"trained": trained.contiguous()}
                if n_pairs:
                    counts["pairs_trained"] = pairs_trained.contiguous()
                save_file(counts, str(root / "trained.safetensors"))
                (root / "train_state.json").write_text(json.dumps(plain(st), indent=1))
                io.report(metrics, root, name)
        else:
            io.report(metrics, None, name)
        attempt["report_s"] += time.monotonic() - t_report  # saved with the next checkpoint
        reported = True

    model.train()
    while st["epoch"] < epochs:
        epoch = st["epoch"]
        perm = epoch_permutation(n, seed, round_no, epoch)
        schedule = epoch_schedule(n, world, int(conf["batch_size"]))
        # The epoch's pairs, shuffled, spread evenly over its steps (each once an epoch).
        pair_perm = epoch_permutation(n_pairs, seed, round_no, epoch, salt="pairs")
        for step in range(st["step"], len(schedule)):
            t_step = time.monotonic()
            lo, hi = schedule[step]
            idx = perm[lo:hi][rank::world]
            torch.manual_seed(_mix(seed, round_no, epoch, step, rank))  # dropout
            ntp = ntp_batch(codes, hist[idx], tgt[idx])
            if ctx is not None:
                ntp["context"] = ctx[idx].long()
            if tw is not None:
                ntp["target_weight"] = tw[idx].float()
            plo, phi = step * n_pairs // len(schedule), (step + 1) * n_pairs // len(schedule)
            pidx = pair_perm[plo:phi][rank::world]
            batch_pairs = _pair_batch(pairs, pidx, codes) if len(pidx) else None
            loss, parts = net(ntp, batch_pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            pending[idx] += 1
            if len(pidx):
                pending_pairs[pidx] += 1
            has_dpo = "dpo" in parts
            parts = {**parts, "steps": 1.0, "dpo_steps": float(has_dpo)}
            sums += torch.tensor([float(parts.get(k, 0.0)) for k in _SUMS], dtype=torch.float64)
            st["step"], st["global_step"] = step + 1, st["global_step"] + 1
            attempt["compute_s"] += time.monotonic() - t_step
            last = step + 1 == len(schedule)
            if last or st["global_step"] % every == 0:
                report(epoch_done=last)
                if (
                    fault.get("action") in ("exit", "raise")
                    and not resumed
                    and rank == 0
                    and st["global_step"] >= int(fault.get("after_step", 1))
                ):
                    io.committed()  # the checkpoint is registered: a resume will find it
                    if fault["action"] == "raise":
                        raise InjectedFault(f"injected fault after step {st['global_step']}")
                    print(
                        f"fault injection: rank 0 exits after step {st['global_step']}", flush=True
                    )
                    os._exit(1)
    if not reported:  # resumed from the final checkpoint: hand it on as the result
        st["step"] = 0
        name = f"ckpt-g{st['global_step']:07d}-a{len(st['attempts']) - 1}-final"
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="recloop-ckpt-") as tmp:
                root = Path(tmp)
                with io.restore() as restored:
                    for f in restored.iterdir():
                        shutil.copy2(f, root / f.name)
                io.report({"round": round_no, "global_step": st["global_step"]}, root, name)
        else:
            io.report({"round": round_no, "global_step": st["global_step"]}, None, name)


# What a worker sums over its steps between reports (then averaged over the ranks).
_SUMS = ("ntp", "moe_aux", "next_item", "steps", "dpo", "dpo_accuracy", "dpo_steps")
_ACC0 = dict.fromkeys(_SUMS, 0.0)


def ntp_batch(codes: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``NtpDpoObjective``'s next-token inputs for histories ``h`` and targets ``t``
    (item ids, 0 = padding)."""
    return {
        "history": codes[h],
        "history_mask": h > 0,
        "target": codes[t],
        "target_mask": t > 0,
        "history_items": h,
        "target_items": t,
    }


def _pair_batch(pairs: dict[str, torch.Tensor], idx: torch.Tensor, codes: torch.Tensor) -> dict:
    """``NtpDpoObjective``'s pair inputs for pairs ``idx`` (item ids -> SID codes)."""
    h, c, r = (pairs[k][idx].long() for k in ("histories", "chosen", "rejected"))
    return {
        "history": h,
        "history_codes": codes[h],
        "chosen_codes": codes[c],
        "chosen_mask": c > 0,
        "rejected_codes": codes[r],
        "rejected_mask": r > 0,
        "ref_chosen": pairs["ref_chosen"][idx].float(),
        "ref_rejected": pairs["ref_rejected"][idx].float(),
    }


def _ray_worker(config: dict[str, Any]) -> None:
    train_worker(config, _RayIO())


def read_train_checkpoint(path: Path) -> dict[str, Any]:
    """Weights, training state and per-example counts of a worker checkpoint."""
    from safetensors.torch import load_file

    counts = load_file(str(path / "trained.safetensors"))
    return {
        "weights": load_file(str(path / "model.safetensors")),
        "state": json.loads((path / "train_state.json").read_text()),
        "trained": counts["trained"],
        "pairs_trained": counts.get("pairs_trained"),
    }


def ray_train(
    cfg: StackConfig, conf: dict[str, Any], run_name: str, workers: int
) -> dict[str, Any]:
    """Run (or resume) the round's Ray Train job; returns ``read_train_checkpoint`` of
    its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = train_dir(cfg) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=conf,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    # Ray Train installs its own SIGINT handler for the run and leaves it behind: put this
    # process's back, or a Ctrl-C between rounds would never stop the trainer.
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return read_train_checkpoint(Path(d))


def local_train(
    cfg: StackConfig, conf: dict[str, Any], run_name: str, workers: int
) -> dict[str, Any]:
    """The round's training in this process, one worker, checkpoints as directories
    under ``<train dir>/local/<run name>`` (resumed like a Ray Train run). For tests and
    debugging; rounds use ``ray_train``."""
    io = LocalIO(train_dir(cfg) / "local" / run_name)
    io.root.mkdir(parents=True, exist_ok=True)
    train_worker(conf, io)
    latest = io.latest()
    if latest is None:
        raise RuntimeError(f"local run {run_name} ended without a checkpoint")
    return read_train_checkpoint(latest)


Trainer = Callable[[StackConfig, dict, str, int], dict]


def worker_conf(
    cfg: StackConfig,
    round_no: int,
    plan: dict[str, Any],
    lineage: str,
    base_version: str,
    histories: torch.Tensor,
    targets: torch.Tensor,
    contexts: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``train_worker``'s config: the round's plan (seed, epochs, batch size, lr,
    checkpoint cadence), where its base comes from, and its training examples (with
    their context rows for a model that takes them)."""
    conf = {
        "round": round_no,
        "seed": plan["seed"],
        "epochs": int(plan["epochs"]),
        "batch_size": plan["batch_size"],
        "lr": plan["lr"],
        "weight_decay": WEIGHT_DECAY,
        "torch_threads": cfg.train.torch_threads,
        "checkpoint_every_steps": plan["checkpoint_every_steps"],
        "registry_uri": cfg.registry_uri,
        "lineage": lineage,
        "base_version": base_version,
        "histories": histories,
        "targets": targets,
        "fault": None,
    }
    if contexts is not None:
        conf["contexts"] = contexts
    if target_weights is not None:
        conf["target_weights"] = target_weights
    return conf


class WarmTrainer:
    """The arm's trainer kept warm between rounds, in the process that runs them (the
    trainer actor, or ``recloop train``): no job, worker group or process to start per
    round, and no registry fetch of a version it already holds.

    It keeps the last few checkpoints it read (the base each round fine-tunes, the
    reference versions of DPO pairs, the gate's base), read-only and in eval mode, and
    one model that trains: at a round's start that model takes the base's weights (a
    copy in memory), so a rejected round's weights never leak into the next one. AdamW
    starts fresh every round, as each round is a fine-tune of the version serving (its
    moments from a rejected trajectory would be wrong to carry); building it is free.

    A round trains through ``train_worker`` with ``LocalIO`` checkpoints under
    ``<train dir>/local/<run>``, like ``local_train``: a trainer killed mid-round and
    started again resumes from the last checkpoint and ends with the weights an unbroken
    round would have had. It is a ``Trainer``: ``warm(cfg, conf, run_name, workers)``.
    """

    def __init__(self, cfg: StackConfig, keep: int = 4) -> None:
        from collections import OrderedDict

        self.cfg = cfg
        self.keep = max(2, keep)
        self._cache: OrderedDict[tuple[str, str], tuple[Any, Path]] = OrderedDict()
        self._codes: dict[tuple[str, str], torch.Tensor] = {}
        self._model: torch.nn.Module | None = None
        self.loads = 0  # checkpoints read from the registry
        self.rounds = 0  # rounds trained in this process
        self.lake: Any = None  # the lake, kept open: its parsed commit log is reused
        self.sessions: dict[tuple[str, int], list[dict]] = {}  # rows of entries not trained
        self.data_warm = False  # Ray Data's workers started (``warm_data``)
        self._said_no_room = False

    def checkpoint(self, reg: Any, lineage: str, version: str) -> tuple[Any, Path]:
        """(Checkpoint, its directory) of ``lineage/version``, from memory when held.
        Do not train it: it is shared (``train`` trains a copy)."""
        from recloop.checkpoint import load_checkpoint

        key = (lineage, version)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = Path(reg.fetch(lineage, version, cache_dir=train_dir(self.cfg) / "cache"))
        ck = load_checkpoint(path)
        ck.model.eval()
        self._cache[key] = (ck, path)
        self.loads += 1
        while len(self._cache) > self.keep:
            old, _ = self._cache.popitem(last=False)
            self._codes.pop(old, None)
        return ck, path

    def prefetch(self, reg: Any, arm: str, progress: Callable[[str], None] = print) -> None:
        """Hold the version serving on ``arm`` (and its code table and a resident model)
        while the rounds wait for data, so the first round after a start, a rollback or
        another trainer's promotion does not pay the load. A no-op when it is held."""
        try:
            record = reg.arm(arm)
        except Exception:  # no such arm yet: the round itself says so
            return
        version = record.get("current")
        if not version:
            return
        key = (record["lineage"], version)
        if key in self._cache:
            return
        t0 = time.monotonic()
        base, _ = self.checkpoint(reg, *key)
        model, _ = self._resident(base, key)
        # torch's first optimizer imports torch._dynamo: 5-12 s on this machine, which
        # every cold round (and every Ray Train worker) pays inside its training.
        torch.optim.AdamW(model.parameters(), lr=1e-3)
        progress(f"warm trainer: holds {key[0]}/{key[1]} ({time.monotonic() - t0:.1f} s)")

    def warm_data(self, progress: Callable[[str], None] = print) -> None:
        """Start the round's Ray Data workers while the rounds wait for data (once; a
        no-op when rounds read in process)."""
        from pipelines.continuous.dataset import NoRoom, engine, warm_up

        tc = self.cfg.train
        if self.data_warm or self.lake is None or engine(tc.data_engine) != "ray":
            return
        t0 = time.monotonic()
        try:
            done = warm_up(
                self.lake, tc.data_cpus, tc.worker_resources, tc.data_tasks, tc.data_timeout_s
            )
        except NoRoom as exc:  # tried again at the next poll (the check costs nothing)
            if not self._said_no_room:
                progress(f"warm trainer: Ray Data workers wait: {exc}")
                self._said_no_room = True
            return
        except Exception as exc:  # the round reads anyway, and says what fails
            progress(f"warm trainer: Ray Data warm-up failed ({type(exc).__name__}: {exc})")
            done = True
        if done:
            self.data_warm = True
            progress(f"warm trainer: Ray Data workers ready ({time.monotonic() - t0:.1f} s)")

    def adopt(self, lineage: str, version: str, ck: Any, path: Path) -> None:
        """Hold a version this process just wrote (the round's published candidate): the
        next round, when it is promoted, starts from it without a registry read."""
        ck.model.eval()
        self._cache[(lineage, version)] = (ck, Path(path))
        while len(self._cache) > self.keep:
            old, _ = self._cache.popitem(last=False)
            self._codes.pop(old, None)

    def reference(self, reg: Any, lineage: str) -> Callable[[str], Any]:
        """``reference`` for ``pipelines.alignment.ipa.build_pairs``: versions from memory."""
        known = set(reg.versions(lineage))
        return lambda v: self.checkpoint(reg, lineage, v)[0] if v in known else None

    def _resident(self, base: Any, key: tuple[str, str]) -> tuple[torch.nn.Module, torch.Tensor]:
        import copy

        from models.ranker import code_table

        if self._model is None or self._model.cfg != base.model.cfg:
            self._model = copy.deepcopy(base.model)
        else:
            with torch.no_grad():
                for p, q in zip(
                    self._model.state_dict().values(), base.model.state_dict().values(), strict=True
                ):
                    p.copy_(q)
        if key not in self._codes:
            self._codes[key] = code_table(base.tokenizer, base.tokenizer.num_items)
        return self._model, self._codes[key]

    def __call__(
        self, cfg: StackConfig, conf: dict[str, Any], run_name: str, workers: int
    ) -> dict[str, Any]:
        from recloop.registry import open_registry

        key = (conf["lineage"], conf["base_version"])
        base, _ = self.checkpoint(open_registry(cfg), *key)
        resident = self._resident(base, key)
        io = LocalIO(train_dir(cfg) / "local" / run_name)
        io.root.mkdir(parents=True, exist_ok=True)
        resident[0].train()
        try:
            train_worker(conf, io, resident)
        finally:
            resident[0].eval()
        latest = io.latest()
        if latest is None:
            raise RuntimeError(f"warm run {run_name} ended without a checkpoint")
        self.rounds += 1
        return read_train_checkpoint(latest)

    def status(self) -> dict[str, Any]:
        return {
            "held": [f"{lin}/{ver}" for lin, ver in self._cache],
            "registry_loads": self.loads,
            "rounds": self.rounds,
            "data_warm": self.data_warm,
        }
