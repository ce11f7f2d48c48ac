"""A round's data: lake entries after the marks, the data policy, next-session examples
and, for a context-trained model, their context rows (see ``pipelines.continuous``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.continuous.state import Progress
from recloop.config import StackConfig
from recloop.examples import arm_weights, check_policy, example_order, session_example
from recloop.lake import SESSIONS, Entry, Lake, write_atomic, write_with
from recloop.train_state import plain

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


def policy_sessions(rows: Sequence[dict], arm: str, policy: str = "own-arm") -> list[dict]:
    """The sessions the data policy learns from: the arm's own ("own-arm", the default)
    or all arms' ("pooled", "weighted")."""
    if check_policy(policy) == "own-arm":
        return [r for r in rows if r.get("arm") == arm]
    return list(rows)


def policy_weights(rows: Sequence[dict], policy: str) -> dict[str, float] | None:
    """Each serving arm's example weight under ``policy``: ``arm_weights`` of the round's
    sessions (every arm's, before the quality bar: the traffic each arm served) for
    "weighted", None (every example counts once) otherwise."""
    if check_policy(policy) != "weighted":
        return None
    return arm_weights([r.get("arm") for r in rows])


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
    watch: torch.Tensor | None = None  # (N, M) watch seconds of each target (clicked) item
    weight: torch.Tensor | None = None  # (N,) each example's weight (data policy "weighted")

    def __len__(self) -> int:
        return len(self.targets)

    def train_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ~self.holdout
        return self.histories[keep], self.targets[keep]

    def target_weights(self, mode: str) -> torch.Tensor | None:
        """(N_train, M) weights of the training targets for ``train.reward_weighting``:
        None for "none"; for "watch" each clicked item's watch time over the mean of the
        training targets' (so the weights average one; 0 on padding). Examples with a
        ``weight`` (the "weighted" data policy) scale their targets' by it, over the mean
        of the training examples' weights."""
        if mode not in ("none", "watch"):
            raise ValueError(f"unknown reward weighting {mode!r}")
        keep = ~self.holdout
        real = self.targets[keep] > 0
        if mode == "none":
            per_target = None
        elif self.watch is None:
            raise ValueError("these examples carry no watch times (built before they were kept)")
        else:
            w = self.watch[keep].double().clamp(min=0.0)
            mean = float(w[real].mean()) if bool(real.any()) else 0.0
            # no watch time at all: every click counts alike
            per_target = (w / mean * real).float() if mean > 0 else real.float()
        if self.weight is None:
            return per_target
        ex = self.weight[keep].double()
        mean = float(ex.mean()) if len(ex) else 0.0
        ex = (ex / mean).float() if mean > 0 else torch.ones(len(ex))
        return (per_target if per_target is not None else real.float()) * ex[:, None]

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
        if self.watch is not None:
            tensors["watch"] = self.watch.contiguous()
        if self.weight is not None:
            tensors["weight"] = self.weight.contiguous()
        write_with(path, lambda tmp: save_file(tensors, tmp))
        write_atomic(path.with_suffix(".json"), json.dumps(plain(meta), indent=1).encode())

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
            t.get("watch"),
            t.get("weight"),
        )


def assemble_examples(
    rows: Sequence[dict],
    examples: Sequence[dict],
    max_history: int,
    session_len: int,
    holdout_fraction: float,
    context: Callable[[dict, list[int]], list[int]] | None = None,
    weights: dict[str, float] | None = None,
) -> SessionExamples:
    """``SessionExamples`` of ``examples`` (``session_example``'s, in event-time order,
    of the session ``rows`` beside them); the newest ``holdout_fraction`` of them (at
    least one when there are two or more) are held out. ``weights``: each example's
    weight by the arm that served its session (``policy_weights``)."""
    from models.ranker import pad_histories

    n = len(examples)
    hist = [e["history"] for e in examples]
    ctx = [context(r, e["history"]) for r, e in zip(rows, examples, strict=True)] if context else []
    holdout = torch.zeros(n, dtype=torch.bool)
    if n >= 2 and holdout_fraction > 0:
        k = min(n - 1, max(1, int(n * holdout_fraction)))
        holdout[n - k :] = True  # rows are in event-time order
    return SessionExamples(
        pad_histories(hist, max_history),
        torch.tensor([e["targets"] for e in examples], dtype=torch.long).view(n, session_len),
        torch.tensor([e["event_time_ms"] for e in examples], dtype=torch.long),
        holdout,
        torch.tensor([e["served"] for e in examples], dtype=torch.long).view(n, session_len),
        None if context is None else torch.tensor(ctx, dtype=torch.long).reshape(n, -1 if n else 0),
        torch.tensor([e["watch"] for e in examples], dtype=torch.float32).view(n, session_len),
        None
        if weights is None
        else torch.tensor([weights.get(str(r.get("arm")), 1.0) for r in rows], dtype=torch.float32),
    )


def build_examples(
    sessions: Sequence[dict],
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    holdout_fraction: float,
    context: Callable[[dict, list[int]], list[int]] | None = None,
    weights: dict[str, float] | None = None,
) -> SessionExamples:
    """One example per session with a known clicked item (see the module docstring),
    in one process: the reference of ``pipelines.continuous.dataset``'s Ray Data path.
    ``context(session row, history in model ids)``: the session's context row, for a
    model that takes one; ``weights``: as ``assemble_examples``'."""
    to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
    rows, examples = [], []
    for r in sorted(sessions, key=example_order):
        ex = session_example(r, to_model, session_len)
        if ex is not None:
            rows.append(r)
            examples.append(ex)
    return assemble_examples(
        rows, examples, max_history, session_len, holdout_fraction, context, weights
    )


def _entries_by_key(lake: Lake, keys: Sequence[Sequence]) -> list[Entry]:
    want = {(str(w), int(s)) for w, s in keys}
    found = [e for e in lake.entries() if (e.writer, e.seq) in want]
    if len(found) != len(want):
        missing = want - {(e.writer, e.seq) for e in found}
        raise RuntimeError(f"lake entries of the round in progress are gone: {sorted(missing)}")
    return found


# What a poll reads to decide whether a round starts (and what it reports): the data
# policy's and the quality bar's columns and the times; a round reads the rest.
POLL_COLUMNS = [
    "arm",
    "clicks",
    "session_watch_s",
    "likes",
    "follows",
    "event_time_ms",
    "last_feedback_ms",
    "record_ts_ms",
]


def _read_sessions(
    lake: Lake,
    entries: Sequence[Entry],
    cache: dict[tuple[str, int], list[dict]] | None = None,
    columns: Sequence[str] = SESSION_COLUMNS,
) -> list[dict]:
    """The session rows of ``entries`` (``columns`` of them). With ``cache`` (a warm
    trainer's: entries are immutable once committed), each entry is read once however
    often the lake is polled while a round waits for data; entries not asked for any
    more are dropped from it."""
    if cache is None:
        return lake.read(SESSIONS, entries, columns=columns).to_pylist()
    keys = [(e.writer, e.seq) for e in entries]
    for key in set(cache) - set(keys):
        del cache[key]
    missing = [e for key, e in zip(keys, entries, strict=True) if key not in cache]
    if missing:  # one read for all of them, split by the commit each row came from
        fresh = {(e.writer, e.seq): [] for e in missing}
        table = lake.read(SESSIONS, missing, columns=columns, with_commit=True)
        for row in table.to_pylist():
            fresh[(row.pop("writer"), row.pop("seq"))].append(row)
        cache.update(fresh)
    return [row for key in keys for row in cache[key]]


def _newest(rows: Sequence[dict], key: str) -> int | None:
    vals = [int(r[key]) for r in rows if r.get(key)]
    return max(vals) if vals else None


def round_context(
    cfg: StackConfig, base: Any, sessions: Sequence[dict], progress: Progress
) -> Callable[[dict, list[int]], list[int]]:
    """Context rows for a round of a context-trained model, built as serving builds them
    (``recloop.inference.LoadedModel.contexts``): each session's event time, its user's Feast
    profile, anchors by the base's popularity plus Feast's item clicks now. A store that
    cannot be read leaves profiles unknown and popularity the base's, and says so."""
    from features.reads import item_clicks, user_profiles
    from recloop.checkpoint import context_builder
    from recloop.context import live_popularity

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
