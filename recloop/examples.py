"""A served session (a row of the lake's sessions table) as a next-session example in
model item ids: the mapping a round applies in its own process and in Ray Data's tasks
(``pipelines.continuous.dataset``). Light on purpose: a Ray Data worker imports this
module, not the training code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pyarrow as pa

# A learning arm's data policy: its own arm's sessions, every arm's, or every arm's with
# each arm's weighted by the inverse of its share of them (see ``arm_weights``).
DATA_POLICIES = ("own-arm", "pooled", "weighted")

# What the examples keep of their session besides the example: the order, a context
# model's row and the weighted policy need them.
_KEPT = ["event_id", "event_time_ms", "user_id", "arm", "context"]
_EXAMPLE_FIELDS = [
    ("history", pa.list_(pa.int64())),
    ("targets", pa.list_(pa.int64())),
    ("served", pa.list_(pa.int64())),
    ("watch", pa.list_(pa.float64())),
]


def session_example(row: dict, to_model: dict[int, int], session_len: int) -> dict | None:
    """One session's example in model item ids (None: no known clicked item): its
    history, clicked items (targets), served items and the targets' watch seconds, the
    last three padded to ``session_len``."""
    items, clicked = row.get("items") or [], row.get("clicked") or []
    secs = row.get("watch_time_s") or []
    secs = [float(x or 0.0) for x in secs] + [0.0] * (len(items) - len(secs))
    pos = zip(items, clicked, secs, strict=False)
    hits = [(to_model[i], s) for i, c, s in pos if c and i in to_model]
    if not hits:
        return None
    t, w = [m for m, _ in hits][:session_len], [s for _, s in hits][:session_len]
    served = [to_model[i] for i in items if i in to_model][:session_len]
    pad = session_len
    return {
        "history": [to_model[i] for i in (row.get("history") or []) if i in to_model],
        "targets": t + [0] * (pad - len(t)),
        "served": served + [0] * (pad - len(served)),
        "watch": w + [0.0] * (pad - len(w)),
        "event_time_ms": int(row["event_time_ms"]),
    }


def check_policy(policy: str) -> str:
    if policy not in DATA_POLICIES:
        raise ValueError(f"data policy must be one of {', '.join(DATA_POLICIES)}, not {policy!r}")
    return policy


def arm_weights(arms: Sequence[str | None]) -> dict[str, float]:
    """The ``weighted`` policy's weight of each arm's sessions, from the arms that served
    a round's sessions (``arms``, one per session): the inverse of the arm's share, scaled
    so every arm's sessions weigh as much in total and the mean weight is one
    (``n / (k * n_arm)`` for ``k`` arms among ``n`` sessions): in the spirit of Si (2023),
    the data of a 25/75 test counts as if the split were even."""
    counts = Counter(str(a) for a in arms)
    n, k = sum(counts.values()), len(counts)
    return {a: n / (k * c) for a, c in sorted(counts.items())}


def example_order(row: dict) -> tuple[int, str]:
    """Examples are in event-time order (the newest are held out)."""
    return int(row["event_time_ms"]), str(row.get("event_id") or "")


def to_examples(batch: pa.Table, item_ids: Sequence[int], session_len: int) -> pa.Table:
    """A batch of session rows → their examples (``data.session_example``), with the
    session columns the round still needs. Rows without a known clicked item drop out."""
    to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
    out: dict[str, list] = {name: [] for name in [*_KEPT, *(f for f, _ in _EXAMPLE_FIELDS)]}
    for row in batch.select(
        ["event_id", "event_time_ms", "user_id", "arm", "context", "history", "items", "clicked"]
        + ["watch_time_s"]
    ).to_pylist():
        ex = session_example(row, to_model, session_len)
        if ex is None:
            continue
        for name in _KEPT:
            out[name].append(row[name])
        for name, _ in _EXAMPLE_FIELDS:
            out[name].append(ex[name])
    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("event_time_ms", pa.int64()),
            ("user_id", pa.int64()),
            ("arm", pa.string()),
            ("context", pa.string()),
            *_EXAMPLE_FIELDS,
        ]
    )
    return pa.Table.from_pydict(out, schema=schema)
