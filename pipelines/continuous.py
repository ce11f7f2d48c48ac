"""Continuous training: the arm's lineage learns from the lake, round after round.

    recloop train [--once] [--arm ARM] [--workers N] [--pooled] [--config FILE]
    recloop train --detach | --stop      # as a long-lived actor of the stack

A round:

1. takes the lake's commit-log entries after the marks of the last completed round,
   oldest commits first and whole entries only, up to ``train.max_sessions`` sessions
   (a writer's entries are always taken in sequence order, so marks stay a prefix);
2. keeps the sessions of the data policy (default *own-arm*: sessions served by
   ``train.arm``; ``pooled``: every arm's) that are high quality in OneRec's sense
   (section 3.2 on our signals: ``clicks >= min_clicks``, or ``session_watch_s >=
   min_watch_s``, or a like or a follow). With fewer than ``min_sessions`` of them it
   waits (marks unchanged) — unless the entries already hold ``max_sessions`` sessions:
   then more data cannot make the round bigger, so it trains on what there is (or, with
   no usable example at all, only advances the marks past those entries: a round never
   stalls on non-qualifying data);
3. builds next-session examples: history = the session's ``history`` (data ids mapped
   to the base model's ids, unknown ones dropped, the latest ``max_history``), target =
   the session's clicked items in position order (truncated/padded to ``session_len``);
   a session without a known clicked item gives no example. The newest
   ``holdout_fraction`` of the examples by event time is held out for the gate;
4. fine-tunes the version serving on the arm (the *base*) with Ray Train: a
   ``TorchTrainer`` of ``train.workers`` CPU workers (DDP over gloo), next-token loss,
   AdamW, ``train.epochs`` epochs; each worker trains on its share of every global batch
   (``batch_size`` examples per worker and step) of a deterministic shuffle (seed, round,
   epoch). Every ``checkpoint_every_steps`` steps and at each epoch's end the workers
   report metrics and a checkpoint (safetensors: weights, AdamW state, the per-example
   count of training passes; JSON: epoch, step, losses);
5. writes the candidate checkpoint (the base's tokenizer and item ids, plus round
   provenance), publishes it to the arm's lineage, runs the gate (``pipelines.gate``)
   and promotes it (registry + Serve hot swap) or records the rejection.

Crash safety. ``<home>/train/<arm>/state.json`` (atomic writes) holds the marks of the
completed rounds and the round in progress: its entries, the marks after it, its base
version, the Ray Train run name and how far it got (trained, published, gated). A
trainer that starts with a round in progress re-runs that same round: the same entries
(its examples file), the same base, the same Ray Train run (``RunConfig(name,
storage_path)``): Ray Train V2 finds the run's checkpoint snapshot in storage and
``ray.train.get_checkpoint()`` hands the workers the latest checkpoint, from which they
continue at the recorded epoch and step. The round's plan (workers, epochs, batch size,
learning rate) is fixed in the state, the shuffle is seeded by (seed, round, epoch) and
dropout by (seed, round, epoch, step, rank), and AdamW's state is restored: a resumed
round replays exactly the batches that were left and ends with the weights an unbroken
run would have had. The marks advance only when the round's version is published (or
refused) and its outcome recorded, in one atomic state write.

Files under ``<home>/train/<arm>/``::

    state.json                     marks, last round, round in progress, recent rounds
    rounds.jsonl                   one JSON line per completed round
    rounds/r<NNNNN>/examples.safetensors + examples.json   the round's examples
    rounds/r<NNNNN>/candidate/     the candidate checkpoint (removed when the round is done)
    ray/<run name>/                Ray Train's storage: checkpoints + its run snapshot
                                   (removed when the round is done)
    local/<run name>/              the same for the in-process trainer (tests)
    cache/                         registry fetches (remote registries only)
    .lock                          one trainer per arm

No pickle crosses a process or disk boundary here: safetensors and JSON on disk; the
examples reach the workers as tensors in ``train_loop_config`` (Ray's own transport).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recloop.config import StackConfig
from recloop.lake import SESSIONS, Entry, Lake, write_atomic, write_with

Progress = Callable[[str], None]
PromoteFn = Callable[[StackConfig, str, str, Progress], Any]

SEED = 0  # training shuffles and dropout derive from (SEED, round, epoch, step)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
MAX_WORKER_FAILURES = 0  # a failed round raises; the next run_round resumes it
KEEP_ROUND_DIRS = 10  # rounds whose examples stay on disk
KEEP_STATE_ROUNDS = 20  # round summaries kept in state.json (all are in rounds.jsonl)
FAULT_ENV = "RECLOOP_TRAIN_FAULT"  # "exit:<step>": rank 0 exits after that step (tests)

SESSION_COLUMNS = [
    "event_id",
    "user_id",
    "arm",
    "model_version",
    "event_time_ms",
    "history",
    "items",
    "feedback",
    "clicked",
    "watch_time_s",
    "liked",
    "followed",
    "clicks",
    "session_watch_s",
    "likes",
    "follows",
    "last_feedback_ms",
    "record_ts_ms",
    "context",  # the request's tags, for a model that reads them
]


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- files
def train_dir(cfg: StackConfig, arm: str | None = None) -> Path:
    return cfg.home / "train" / (arm or cfg.train.arm)


def state_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "state.json"


def rounds_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "rounds.jsonl"


def round_dir(cfg: StackConfig, round_no: int) -> Path:
    return train_dir(cfg) / "rounds" / f"r{round_no:05d}"


def load_state(cfg: StackConfig, arm: str | None = None) -> dict[str, Any]:
    path = state_path(cfg, arm)
    if not path.exists():
        return {
            "arm": arm or cfg.train.arm,
            "marks": {},
            "pref_offsets": {},  # recloop.preferences partition -> next offset to train on
            "round": 0,
            "in_progress": None,
            "rounds": [],
        }
    return json.loads(path.read_text())


def _save_state(cfg: StackConfig, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=1, sort_keys=True, allow_nan=False).encode()
    write_atomic(state_path(cfg, state["arm"]), data)


def read_rounds(cfg: StackConfig, arm: str | None = None) -> list[dict[str, Any]]:
    path = rounds_path(cfg, arm)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_round(cfg: StackConfig, record: dict[str, Any]) -> None:
    """Append ``record`` to rounds.jsonl unless a line for the same round is there (a
    trainer that crashed after the append and before the state write redoes this)."""
    path = rounds_path(cfg)
    if record.get("round") is not None:
        if any(
            r.get("round") == record["round"] and r.get("run") == record.get("run")
            for r in read_rounds(cfg)
        ):
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(_plain(record), sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _arm_lock(cfg: StackConfig) -> Iterator[None]:
    path = train_dir(cfg) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another trainer holds {path}: one trainer per arm ({cfg.train.arm})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _plain(x: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- data policy
def session_rows(entry: Entry) -> int:
    """Sessions an entry commits (its orphans do not count)."""
    return sum(int(f["rows"]) for f in entry.files if f["table"] == SESSIONS)


def select_entries(new: Sequence[Entry], max_sessions: int) -> tuple[list[Entry], bool]:
    """The round's entries: oldest commits first, whole entries, at most ``max_sessions``
    sessions (but at least one entry, however big). Entries of one writer are taken in
    sequence order, so the marks after them cover exactly what was taken. Returns (the
    entries, whether entries were left for later rounds)."""
    queues: dict[str, list[Entry]] = {}
    for e in new:
        queues.setdefault(e.writer, []).append(e)
    for q in queues.values():
        q.sort(key=lambda e: e.seq)
    taken: list[Entry] = []
    rows = 0
    while queues:
        w = min(queues, key=lambda w: (queues[w][0].committed_at_ms, w, queues[w][0].seq))
        e = queues[w][0]
        n = session_rows(e)
        if taken and rows + n > max_sessions:
            return taken, True
        taken.append(e)
        rows += n
        queues[w].pop(0)
        if not queues[w]:
            del queues[w]
    return taken, False


def is_high_quality(row: dict[str, Any], min_clicks: int, min_watch_s: float) -> bool:
    """OneRec 3.2's high-quality session on our signals: enough items watched (clicks),
    enough watch time, or an interaction (a like or a follow)."""
    return (
        int(row.get("clicks") or 0) >= min_clicks
        or float(row.get("session_watch_s") or 0.0) >= min_watch_s
        or int(row.get("likes") or 0) > 0
        or int(row.get("follows") or 0) > 0
    )


def policy_sessions(rows: Sequence[dict], arm: str, pooled: bool = False) -> list[dict]:
    """The sessions the data policy learns from: the arm's own (default) or all arms'."""
    return list(rows) if pooled else [r for r in rows if r.get("arm") == arm]


def quality_sessions(rows: Sequence[dict], min_clicks: int, min_watch_s: float) -> list[dict]:
    return [r for r in rows if is_high_quality(r, min_clicks, min_watch_s)]


@dataclass
class SessionExamples:
    """Next-session examples in the base model's item ids, oldest first by event time."""

    histories: torch.Tensor  # (N, H) left-padded with 0
    targets: torch.Tensor  # (N, M) clicked items by position, right-padded with 0
    event_time_ms: torch.Tensor  # (N,)
    holdout: torch.Tensor  # (N,) bool: the newest, for the gate only
    served: torch.Tensor | None = None  # (N, M) every served item by position (the gate)
    context: torch.Tensor | None = None  # (N, W) context rows, for a model that takes them

    def __len__(self) -> int:
        return len(self.targets)

    def train_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ~self.holdout
        return self.histories[keep], self.targets[keep]

    def holdout_raw(self, item_ids: Sequence[int]) -> list[dict]:
        """The held-out slice in data item ids, as the gate takes it."""
        to_data = [0, *[int(i) for i in item_ids]]
        out = []
        served = self.served[self.holdout] if self.served is not None else None
        context = self.context[self.holdout] if self.context is not None else None
        for j, (h, t) in enumerate(
            zip(self.histories[self.holdout], self.targets[self.holdout], strict=True)
        ):
            ex = {
                "history": [to_data[i] for i in h.tolist() if i > 0],
                "items": [to_data[i] for i in t.tolist() if i > 0],
            }
            if served is not None:
                ex["served"] = [to_data[i] for i in served[j].tolist() if i > 0]
            if context is not None:
                ex["context"] = context[j].tolist()
            out.append(ex)
        return out

    def save(self, path: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        tensors = {
            "histories": self.histories.contiguous(),
            "targets": self.targets.contiguous(),
            "event_time_ms": self.event_time_ms.contiguous(),
            "holdout": self.holdout.to(torch.uint8).contiguous(),
        }
        if self.served is not None:
            tensors["served"] = self.served.contiguous()
        if self.context is not None:
            tensors["context"] = self.context.contiguous()
        write_with(path, lambda tmp: save_file(tensors, tmp))
        write_atomic(path.with_suffix(".json"), json.dumps(_plain(meta), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> SessionExamples:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(
            t["histories"],
            t["targets"],
            t["event_time_ms"],
            t["holdout"].bool(),
            t.get("served"),
            t.get("context"),
        )


def build_examples(
    sessions: Sequence[dict],
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    holdout_fraction: float,
    context: Callable[[dict, list[int]], list[int]] | None = None,
) -> SessionExamples:
    """One example per session with a known clicked item (see the module docstring);
    the newest ``holdout_fraction`` of them (at least one when there are two or more)
    are held out. ``context(session row, history in model ids)``: the session's context
    row, for a model that takes one."""
    to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
    rows = sorted(sessions, key=lambda r: (int(r["event_time_ms"]), str(r.get("event_id") or "")))
    hist, tgt, times, served, ctx = [], [], [], [], []
    for r in rows:
        items, clicked = r.get("items") or [], r.get("clicked") or []
        t = [to_model[i] for i, c in zip(items, clicked, strict=False) if c and i in to_model]
        if not t:
            continue
        hist.append([to_model[i] for i in (r.get("history") or []) if i in to_model])
        if context is not None:
            ctx.append(context(r, hist[-1]))
        tgt.append(t[:session_len] + [0] * (session_len - len(t[:session_len])))
        s = [to_model[i] for i in items if i in to_model][:session_len]
        served.append(s + [0] * (session_len - len(s)))
        times.append(int(r["event_time_ms"]))
    from pipelines.train_onerec import pad_histories

    n = len(tgt)
    histories = pad_histories(hist, max_history)
    targets = torch.tensor(tgt, dtype=torch.long).view(n, session_len)
    holdout = torch.zeros(n, dtype=torch.bool)
    if n >= 2 and holdout_fraction > 0:
        k = min(n - 1, max(1, int(n * holdout_fraction)))
        holdout[n - k :] = True  # rows are in event-time order
    return SessionExamples(
        histories,
        targets,
        torch.tensor(times, dtype=torch.long),
        holdout,
        torch.tensor(served, dtype=torch.long).view(n, session_len),
        None if context is None else torch.tensor(ctx, dtype=torch.long).reshape(n, -1 if n else 0),
    )


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


def train_worker(conf: dict[str, Any], io: WorkerIO) -> None:
    """One worker's part of a round's training (Ray Train calls it via ``_ray_worker``).

    ``conf``: round, seed, epochs, batch_size, lr, weight_decay, torch_threads,
    checkpoint_every_steps, model_dir (the base checkpoint directory; or registry_uri,
    lineage, base_version to fetch it), histories (N, H), targets (N, M), fault; for IPA
    rounds also pairs (``pipelines.ipa.PairSet.tensors()``), dpo_beta and dpo_weight: every
    step then also trains on its slice of the epoch's shuffled pairs with the DPO loss."""
    from safetensors.torch import load_file, save_file

    from models.dpo import NtpDpoObjective
    from pipelines.checkpoint import load_checkpoint
    from pipelines.train_onerec import code_table

    entered = time.monotonic()
    torch.set_num_threads(int(conf.get("torch_threads", 1)))
    rank, world = io.rank, io.world
    model_dir = conf.get("model_dir")
    if model_dir is None:
        from serving.registry import ModelRegistry

        reg = ModelRegistry(conf["registry_uri"])
        model_dir = reg.fetch(conf["lineage"], conf["base_version"])
    ck = load_checkpoint(model_dir)
    model, codes = ck.model, code_table(ck.tokenizer, ck.tokenizer.num_items)
    loaded_s = time.monotonic() - entered
    hist, tgt = conf["histories"].long(), conf["targets"].long()
    ctx = conf.get("contexts")  # (N, W) for a model that takes a context
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
                (root / "train_state.json").write_text(json.dumps(_plain(st), indent=1))
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
            h, t = hist[idx], tgt[idx]
            ntp = {
                "history": codes[h],
                "history_mask": h > 0,
                "target": codes[t],
                "target_mask": t > 0,
                "history_items": h,
                "target_items": t,
            }
            if ctx is not None:
                ntp["context"] = ctx[idx].long()
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
    return conf


# --------------------------------------------------------------------------- promotion
def promote_serving(cfg: StackConfig, arm: str, version: str, progress: Progress = print) -> Any:
    """Registry promote, then a Serve redeploy (hot swap) when the service is deployed;
    with no service deployed the registry is the whole truth (a later ``recloop serve``
    deploys the current version)."""
    from serving import control

    try:
        from serving.app import app_status

        deployed = bool(app_status(cfg))
    except Exception:
        deployed = False
    if deployed:
        return control.promote(cfg, arm, version, progress)
    record = control.registry(cfg).promote(arm, version)
    progress(f"arm {arm}: {version} is current (no service deployed: registry only)")
    return record


def promote_registry(cfg: StackConfig, arm: str, version: str, progress: Progress = print) -> Any:
    """Registry-only promotion (no Serve redeploy): for tests and offline use."""
    from serving import control

    record = control.registry(cfg).promote(arm, version)
    progress(f"arm {arm}: {version} is current (registry)")
    return record


# --------------------------------------------------------------------------- a round
def _entries_by_key(lake: Lake, keys: Sequence[Sequence]) -> list[Entry]:
    want = {(str(w), int(s)) for w, s in keys}
    found = [e for e in lake.entries() if (e.writer, e.seq) in want]
    if len(found) != len(want):
        missing = want - {(e.writer, e.seq) for e in found}
        raise RuntimeError(f"lake entries of the round in progress are gone: {sorted(missing)}")
    return found


def _read_sessions(lake: Lake, entries: Sequence[Entry]) -> list[dict]:
    return lake.read(SESSIONS, entries, columns=SESSION_COLUMNS).to_pylist()


def _newest(rows: Sequence[dict], key: str) -> int | None:
    vals = [int(r[key]) for r in rows if r.get(key)]
    return max(vals) if vals else None


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
    _append_round(cfg, record)
    state["marks"] = marks
    if record.get("pref_offsets") is not None:  # the round's pairs are consumed with it
        state["pref_offsets"] = record["pref_offsets"]
    if record.get("round") is not None:
        state["round"] = record["round"]
    state["in_progress"] = None
    state["rounds"] = (state.get("rounds", []) + [_plain(record)])[-KEEP_STATE_ROUNDS:]
    _save_state(cfg, state)
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


def round_context(
    cfg: StackConfig, base: Any, sessions: Sequence[dict], progress: Progress
) -> Callable[[dict, list[int]], list[int]]:
    """Context rows for a round of a context-trained model, built as serving builds them
    (``serving.app.LoadedModel.contexts``): each session's event time, its user's Feast
    profile, anchors by the base's popularity plus Feast's item clicks now. A store that
    cannot be read leaves profiles unknown and popularity the base's, and says so."""
    from pipelines.checkpoint import context_builder
    from pipelines.context import live_popularity
    from serving.features import item_clicks, user_profiles

    builder = context_builder(base)
    profiles: dict[int, dict] = {}
    item_ids = base.meta.get("item_ids") or list(range(1, base.tokenizer.num_items + 1))
    try:
        from features.store import open_store

        store = open_store(cfg)
        if "age" in builder.fields:
            profiles = user_profiles(store, sorted({int(r["user_id"]) for r in sessions}))
        if builder.anchors:
            to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
            pop, _ = live_popularity(builder.popularity, to_model, item_clicks(store, item_ids))
            builder.set_popularity(pop)
    except Exception as exc:
        progress(f"context: Feast unreadable ({type(exc).__name__}: {exc}); profiles unknown")

    def row(session: dict, history: list[int]) -> list[int]:
        when = int(session["event_time_ms"]) / 1000
        try:
            tags = json.loads(session.get("context") or "{}")
        except ValueError:
            tags = {}
        tags = tags if isinstance(tags, dict) else {}
        return builder.row(history, when, profiles.get(int(session["user_id"])), tags)

    return row


def run_round(
    cfg: StackConfig,
    progress: Progress = print,
    pooled: bool = False,
    promote: PromoteFn | None = None,
    trainer: Trainer | None = None,
) -> dict | None:
    """One round (see the module docstring), or the round in progress resumed. Returns
    the round's record, or None when there is not enough new data yet.

    ``promote(cfg, arm, version, progress)`` defaults to ``promote_serving`` (registry +
    Serve hot swap when the service is deployed); ``trainer(cfg, conf, run_name,
    workers)`` to ``ray_train``."""
    # The driver's own torch work (reward model, reference log p, the gate) on
    # train.torch_threads: torch's default of every core spins on a shared 2-core machine.
    torch.set_num_threads(cfg.train.torch_threads)
    with _arm_lock(cfg):
        return _run_round(cfg, progress, pooled, promote or promote_serving, trainer or ray_train)


def _run_round(
    cfg: StackConfig, progress: Progress, pooled: bool, promote: PromoteFn, trainer: Trainer
) -> dict | None:
    from pipelines.checkpoint import load_checkpoint
    from serving.control import registry

    tc, arm = cfg.train, cfg.train.arm
    state = load_state(cfg)
    lake = Lake(cfg.lake_dir)
    reg = registry(cfg)
    ip = state.get("in_progress")
    if ip is None:
        new = lake.new_entries(state["marks"])
        if not new:
            return None
        entries, capped = select_entries(new, tc.max_sessions)
        rows = _read_sessions(lake, entries)
        mine = policy_sessions(rows, arm, pooled)
        hq = quality_sessions(mine, tc.min_clicks, tc.min_watch_s)
        marks_after = Lake.advance(state["marks"], entries)
        if len(hq) < tc.min_sessions and not capped:
            progress(
                f"waiting for data: {len(hq)} high-quality sessions of {tc.min_sessions} "
                f"({len(rows)} sessions in {len(entries)} new commits)"
            )
            return None
        lineage, base_version = _base(cfg, reg, arm)
        base_dir = reg.fetch(lineage, base_version, cache_dir=train_dir(cfg) / "cache")
        base = load_checkpoint(base_dir)
        item_ids = base.meta.get("item_ids") or list(range(1, base.tokenizer.num_items + 1))
        mc = base.model.cfg
        context = round_context(cfg, base, hq, progress) if mc.context_width else None
        ex = build_examples(
            hq, item_ids, mc.max_history, mc.session_len, tc.holdout_fraction, context
        )
        n_train = int((~ex.holdout).sum())
        info = {
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
            "pooled": pooled,
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
            from pipelines.ipa import round_inputs

            pairs, pref_after, reward = round_inputs(
                cfg,
                reg,
                state.get("pref_offsets", {}),
                mine,
                item_ids,
                mc,
                round_no,
                lineage,
                train_dir(cfg),
                progress,
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
            # fixed for the round: a resume must replay the same batches and steps
            "plan": {
                "workers": max(1, min(tc.workers, n_train)),
                "epochs": tc.epochs,
                "batch_size": tc.batch_size,
                "lr": tc.lr,
                "checkpoint_every_steps": tc.checkpoint_every_steps,
                "seed": SEED,
            },
        }
        state["in_progress"] = ip
        _save_state(cfg, state)
        progress(
            f"round {round_no}: {info['hq_sessions']} high-quality sessions of "
            f"{info['sessions']} in {len(entries)} commits -> {len(ex)} examples "
            f"({n_train} train, {info['holdout_examples']} held out); base {base_version}"
        )
    else:
        progress(f"resuming round {ip['round']} ({ip['run']}, phase {ip['phase']})")
        _entries_by_key(lake, ip["entries"])  # the round's data must still be there
        base_dir = reg.fetch(ip["lineage"], ip["base_version"], cache_dir=train_dir(cfg) / "cache")
        base = load_checkpoint(base_dir)
        item_ids = base.meta.get("item_ids") or list(range(1, base.tokenizer.num_items + 1))
        ex = SessionExamples.load(round_dir(cfg, ip["round"]) / "examples.safetensors")
    return _finish_round(cfg, state, ip, ex, base, base_dir, item_ids, progress, promote, trainer)


def _round_pairs(cfg: StackConfig, ip: dict):
    """The round's preference pairs (IPA rounds), None otherwise."""
    path = round_dir(cfg, ip["round"]) / "pairs.safetensors"
    if ip.get("pref_offsets_after") is None or not path.exists():
        return None
    from pipelines.ipa import PairSet

    return PairSet.load(path)


def _finish_round(cfg, state, ip, ex, base, base_dir, item_ids, progress, promote, trainer) -> dict:
    from pipelines.checkpoint import save_checkpoint
    from pipelines.gate import GateResult, gate
    from serving.control import registry
    from serving.registry import RegistryError

    tc, arm, reg = cfg.train, cfg.train.arm, registry(cfg)
    rdir = round_dir(cfg, ip["round"])
    cand_dir = rdir / "candidate"
    info = ip["info"]
    h_train, t_train = ex.train_part()
    plan = ip["plan"]
    workers, epochs = int(plan["workers"]), int(plan["epochs"])
    if ip["phase"] == "training":
        if trainer is ray_train:
            from recloop.ray_head import connect

            connect(cfg)
        c_train = None if ex.context is None else ex.context[~ex.holdout]
        conf = worker_conf(
            cfg, ip["round"], plan, ip["lineage"], ip["base_version"], h_train, t_train, c_train
        )
        conf["fault"] = _fault_from_env()
        pairs = _round_pairs(cfg, ip)
        if pairs is not None and len(pairs):
            conf["pairs"] = pairs.tensors()
            conf["dpo_beta"], conf["dpo_weight"] = cfg.dpo.beta, cfg.dpo.weight
        ip["attempts"] = int(ip.get("attempts", 0)) + 1
        _save_state(cfg, state)
        t0 = time.monotonic()
        try:
            out = trainer(cfg, conf, ip["run"], workers)
        finally:
            ip["train_s"] = float(ip.get("train_s", 0.0)) + time.monotonic() - t0
            _save_state(cfg, state)
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
        model = base.model
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
            "pooled": info["pooled"],
            "history": st["epochs"],
            "attempts": st["attempts"],
        }
        if base.meta.get("context"):  # the same rows are built for it in serving
            meta["context"] = base.meta["context"]
        save_checkpoint(cand_dir, model, base.tokenizer, _plain(meta))
        ip["training"] = {
            "epochs": st["epochs"],
            "attempts": st["attempts"],
            "global_steps": st["global_step"],
            "trained_examples": int(trained.sum()),
            "trained_pairs": n_pairs,
            "workers": workers,
        }
        ip["phase"] = "trained"
        _save_state(cfg, state)
        losses = [round(e["ntp_loss"], 4) for e in st["epochs"]]
        progress(
            f"round {ip['round']}: trained {int(trained.sum())} example passes in "
            f"{ip['train_s']:.1f} s on {workers} workers; ntp loss by epoch {losses}"
        )

    if ip["phase"] == "trained":
        metrics = _plain(
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
                _save_state(cfg, state)
        if ip["phase"] == "trained":
            ip["published"] = True
            ip["phase"] = "published"
            _save_state(cfg, state)
            progress(f"round {ip['round']}: published {ip['lineage']}/{ip['version']}")

    if ip["phase"] == "published":
        cand = reg.fetch(ip["lineage"], ip["version"], cache_dir=train_dir(cfg) / "cache")
        holdout = ex.holdout_raw(item_ids)
        result = gate(cand, base_dir, holdout, tc.tolerance)
        ip["gate"] = result.to_json()
        ip["phase"] = "gated"
        _save_state(cfg, state)
        progress(
            f"round {ip['round']}: gate {'passed' if result.passed else 'REJECTED'}: "
            f"{result.reason}"
        )

    if ip["phase"] == "gated":
        if ip["gate"]["passed"]:
            promote(cfg, arm, ip["version"], progress)
            ip["status"] = "promoted"
        else:
            ip["status"] = "rejected"
        ip["phase"] = "decided"
        _save_state(cfg, state)

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


# --------------------------------------------------------------------------- loop, freshness
def train_forever(
    cfg: StackConfig,
    stop: threading.Event | None = None,
    progress: Progress = print,
    pooled: bool = False,
    promote: PromoteFn | None = None,
    trainer: Trainer | None = None,
) -> None:
    """Round after round until ``stop`` is set: a round as soon as the lake has enough
    new data (polled every ``train.poll_s``); a failed round is resumed on the next poll."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            record = run_round(cfg, progress, pooled, promote, trainer)
        except Exception as exc:  # the state keeps the round in progress: resume it
            progress(
                f"round failed ({type(exc).__name__}: {exc}); retrying in {cfg.train.poll_s:.0f} s"
            )
            record = None
        if record is not None and record.get("status") != "skipped":
            progress(
                json.dumps(
                    {
                        k: record.get(k)
                        for k in (
                            "round",
                            "status",
                            "version",
                            "examples",
                            "train_s",
                            "examples_per_s",
                        )
                    }
                )
            )
            continue  # more data may be waiting
        if record is None:
            stop.wait(cfg.train.poll_s)


def freshness(cfg: StackConfig, arm: str | None = None) -> dict[str, Any]:
    """How fresh the arm's serving model is: the newest feedback (event time) and record
    (wall clock) its training saw, the delay from that record to now and to the
    version's promotion, and the lake's newest event time vs the version's."""
    from pipelines.checkpoint import checkpoint_format
    from serving.control import registry

    arm = arm or cfg.train.arm
    reg = registry(cfg)
    record = reg.arm(arm)
    version = record["current"]
    out: dict[str, Any] = {"arm": arm, "version": version, "lineage": record["lineage"]}
    lake = Lake(cfg.lake_dir)
    newest_lake = lake.newest_event_ms(SESSIONS)
    out["lake_newest_event_ms"] = newest_lake
    if version is None:
        return out
    path = reg.fetch(record["lineage"], version, cache_dir=train_dir(cfg, arm) / "cache")
    meta = json.loads((Path(path) / "config.json").read_text())
    now = _now_ms()
    promoted = [h["at"] for h in record.get("history", []) if h.get("version") == version]
    out.update(
        {
            "format": checkpoint_format(path),
            "round": meta.get("round"),
            "newest_event_ms": meta.get("newest_event_ms"),
            "newest_feedback_ms": meta.get("newest_feedback_ms"),
            "newest_record_ts_ms": meta.get("newest_record_ts_ms"),
            "now_ms": now,
            "promoted_at": promoted[-1] if promoted else None,
        }
    )
    rec_ts = meta.get("newest_record_ts_ms")
    out["feedback_age_s"] = (now - rec_ts) / 1000 if rec_ts else None
    if rec_ts and promoted:
        from datetime import datetime

        at_ms = datetime.fromisoformat(promoted[-1]).timestamp() * 1000
        out["feedback_to_serving_s"] = (at_ms - rec_ts) / 1000
    else:
        out["feedback_to_serving_s"] = None
    ev = meta.get("newest_event_ms")
    out["event_time_lag_s"] = (newest_lake - ev) / 1000 if ev and newest_lake else None
    return out


# --------------------------------------------------------------------------- as a Ray actor
def actor_name(arm: str) -> str:
    return f"trainer-{arm}"


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=2)  # the Ray Train workers hold the CPUs
    class TrainerActor:
        def __init__(self, cfg: dict, pooled: bool) -> None:
            self.cfg = StackConfig.from_dict(cfg)
            self.pooled = pooled
            self.stop_event = threading.Event()

        def run(self) -> None:
            train_forever(self.cfg, self.stop_event, _log, self.pooled)

        def run_once(self) -> dict | None:
            return run_round(self.cfg, _log, self.pooled)

        def status(self) -> dict[str, Any]:
            return {"rounds": read_rounds(self.cfg)[-5:], "freshness": freshness(self.cfg)}

        def stop(self) -> None:
            self.stop_event.set()

    return TrainerActor


def start_actor(cfg: StackConfig, pooled: bool = False, progress: Progress = print, run=True):
    """The arm's trainer as a detached actor of the stack (idempotent); ``run`` starts
    its rounds (``train_forever``) at once."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    name = actor_name(cfg.train.arm)
    try:
        actor = ray.get_actor(name)
        progress(f"{name} is running already")
        return actor
    except ValueError:
        pass
    actor = _actor_class().options(name=name, lifetime="detached").remote(cfg.to_dict(), pooled)
    if run:
        actor.run.remote()
    progress(f"started {name} (detached actor; its rounds run on Ray Train workers)")
    return actor


def stop_actor(cfg: StackConfig, progress: Progress = print) -> bool:
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    try:
        actor = ray.get_actor(actor_name(cfg.train.arm))
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor)  # a round in progress resumes when a trainer starts again
    progress(f"stopped {actor_name(cfg.train.arm)}")
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recloop train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="stack run file (home, Ray, registry)")
    ap.add_argument("--home", help="state folder (default .recloop)")
    ap.add_argument("--arm", help="the arm whose lineage is trained (train.arm)")
    ap.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    ap.add_argument("--pooled", action="store_true", help="learn from every arm's sessions")
    ap.add_argument(
        "--dpo",
        action="store_true",
        help="iterative preference alignment: the reward model and DPO on the arm's pairs",
    )
    ap.add_argument("--once", action="store_true", help="one round (or wait for none), then exit")
    ap.add_argument("--freshness", action="store_true", help="print the serving model's freshness")
    ap.add_argument("--detach", action="store_true", help="run as a detached actor of the stack")
    ap.add_argument("--stop", action="store_true", help="stop the arm's detached trainer")
    return ap


def main(argv: list[str] | None = None) -> int:
    from recloop.config import load_config

    args = build_parser().parse_args(argv)
    cfg = load_config(
        args.config,
        overrides={
            "home": args.home,
            "train.arm": args.arm,
            "train.workers": args.workers,
            "train.dpo": True if args.dpo else None,
        },
    )
    if args.freshness:
        print(json.dumps(freshness(cfg), indent=2))
        return 0
    if args.detach:
        start_actor(cfg, args.pooled, _log)
        return 0
    if args.stop:
        return 0 if stop_actor(cfg, _log) else 1
    from recloop.ray_head import connect

    connect(cfg)
    if args.once:
        record = run_round(cfg, _log, pooled=args.pooled)
        print(json.dumps(record, indent=2) if record else "no round: not enough new data")
        return 0
    stop = threading.Event()
    try:
        train_forever(cfg, stop, _log, pooled=args.pooled)
    except KeyboardInterrupt:
        stop.set()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
