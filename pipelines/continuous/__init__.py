"""Continuous training: the arm's lineage learns from the lake, round after round.

    recloop train [--once] [--arm ARM] [--workers N] [--data-policy P] [--config FILE]
    recloop train --detach | --stop      # as a long-lived actor of the stack

A round:

1. takes the lake's commit-log entries after the marks of the last completed round,
   oldest commits first and whole entries only, up to ``train.max_sessions`` sessions
   (a writer's entries are always taken in sequence order, so marks stay a prefix);
2. keeps the sessions of the data policy (default *own-arm*: sessions served by
   ``train.arm``; ``pooled``: every arm's; ``weighted``: every arm's, each arm's
   sessions weighted by the inverse of its share of the round's sessions, so every
   arm's traffic counts as much in total) that are high quality in OneRec's sense
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
   provenance), publishes it to the arm's lineage, runs the gate (``continuous.gate``)
   and promotes it (registry + Serve hot swap) or records the rejection.

Crash safety. ``<home>/train/<arm>/state.json`` (atomic writes; its readers and writers
are ``recloop.train_state``'s, the monitor reads it too) holds the marks of the completed
rounds and the round in progress: its entries, the marks after it, its base version, the
Ray Train run name and how far it got (trained, published, gated). A trainer that starts
with a round in progress re-runs that same round: the same entries (its examples file),
the same base, the same Ray Train run (``RunConfig(name, storage_path)``): Ray Train V2
finds the run's checkpoint snapshot in storage and ``ray.train.get_checkpoint()`` hands
the workers the latest checkpoint, from which they continue at the recorded epoch and
step. The round's plan (workers, epochs, batch size, learning rate) is fixed in the
state, the shuffle is seeded by (seed, round, epoch) and dropout by (seed, round, epoch,
step, rank), and AdamW's state is restored: a resumed round replays exactly the batches
that were left and ends with the weights an unbroken run would have had. The marks
advance only when the round's version is published (or refused) and its outcome
recorded, in one atomic state write.

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

from pipelines.continuous.data import (
    SESSION_COLUMNS,
    SessionExamples,
    build_examples,
    is_high_quality,
    policy_sessions,
    policy_weights,
    quality_sessions,
    round_context,
    select_entries,
    session_rows,
)
from pipelines.continuous.job import (
    actor_name,
    build_parser,
    main,
    start_actor,
    stop_actor,
    train_forever,
)
from pipelines.continuous.rounds import (
    default_trainer,
    promote_registry,
    promote_serving,
    run_round,
)
from pipelines.continuous.state import FAULT_ENV, SEED, round_dir
from pipelines.continuous.trainer import (
    InjectedFault,
    LocalIO,
    WarmTrainer,
    WorkerIO,
    _load_optimizer,
    _save_optimizer,
    epoch_permutation,
    epoch_schedule,
    local_train,
    ray_train,
    read_train_checkpoint,
    train_worker,
    worker_conf,
)
from recloop.examples import DATA_POLICIES

__all__ = [
    "DATA_POLICIES",
    "FAULT_ENV",
    "SEED",
    "SESSION_COLUMNS",
    "InjectedFault",
    "LocalIO",
    "SessionExamples",
    "WarmTrainer",
    "WorkerIO",
    "_load_optimizer",
    "_save_optimizer",
    "actor_name",
    "build_examples",
    "build_parser",
    "default_trainer",
    "epoch_permutation",
    "epoch_schedule",
    "is_high_quality",
    "local_train",
    "main",
    "policy_sessions",
    "policy_weights",
    "promote_registry",
    "promote_serving",
    "quality_sessions",
    "ray_train",
    "read_train_checkpoint",
    "round_context",
    "round_dir",
    "run_round",
    "select_entries",
    "session_rows",
    "start_actor",
    "stop_actor",
    "train_forever",
    "train_worker",
    "worker_conf",
]
