"""A round trip through every part of a running stack.

1. Kafka: an impression and its interaction go out through the producer helper and come
   back through a fresh consumer group; a malformed record goes to the DLQ.
2. Feast: a user's history is pushed and read back from the online store.
3. Ray Serve: a trivial app is deployed and answers ``GET /ping`` over HTTP.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pandas as pd

from recloop.config import StackConfig
from recloop.events import DeadLetter, Impression, Interaction, ServedItem, decode
from recloop.kafka_io import EventConsumer, EventProducer
from recloop.ray_head import connect
from recloop.topics import DLQ, IMPRESSIONS, INTERACTIONS

SMOKE_USER = 1


def _kafka_round_trip(cfg: StackConfig) -> str:
    request_id = f"smoke-{uuid.uuid4().hex[:12]}"
    now = int(time.time() * 1000)
    impression = Impression(
        event_time_ms=now,
        request_id=request_id,
        user_id=SMOKE_USER,
        arm="smoke",
        model_version="none",
        items=[
            ServedItem(item_id=i, position=p, score=1.0 / (p + 1)) for p, i in enumerate([3, 1, 2])
        ],
    )
    interaction = Interaction(
        event_time_ms=now + 1,
        request_id=request_id,
        user_id=SMOKE_USER,
        item_id=3,
        position=0,
        arm="smoke",
        model_version="none",
        clicked=True,
        watch_time_s=42.0,
        liked=True,
    )
    with EventProducer(cfg.kafka.bootstrap, client_id="recloop-smoke") as producer:
        producer.send(impression).get(timeout=30)
        producer.send(interaction).get(timeout=30)
        bad = producer.send_raw(
            INTERACTIONS.name, b'{"request_id": "' + request_id.encode() + b'"}'
        )
        bad.get(timeout=30)

    # A fresh group reads the topics from the start; stop once our request is seen.
    seen: dict[str, object] = {}
    with EventConsumer(
        cfg.kafka.bootstrap,
        [IMPRESSIONS.name, INTERACTIONS.name],
        group_id=f"recloop-smoke-{uuid.uuid4().hex[:8]}",
        client_id="recloop-smoke",
    ) as consumer:
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            for rec in consumer.poll(timeout_ms=1000):
                if rec.event.request_id == request_id:
                    seen[rec.topic] = rec.event
            consumer.commit()
    if seen.get(IMPRESSIONS.name) != impression or seen.get(INTERACTIONS.name) != interaction:
        raise AssertionError(f"Kafka round trip lost events for {request_id}: saw {list(seen)}")

    # The malformed record must be in the DLQ, with its reason.
    from kafka import KafkaConsumer

    dlq = KafkaConsumer(
        DLQ.name,
        bootstrap_servers=cfg.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
        client_id="recloop-smoke-dlq",
    )
    try:
        letters = [decode(DeadLetter, m.value) for m in dlq]
    finally:
        dlq.close()
    mine = [d for d in letters if request_id.encode() in d.raw_value]
    if not mine:
        raise AssertionError("the malformed smoke record did not reach the DLQ")
    return f"impression + interaction round trip ok; DLQ reason: {mine[-1].reason[:70]}..."


def _feast_round_trip(cfg: StackConfig) -> str:
    from features import store as feature_store

    fs = feature_store.open_store(cfg)
    history = [5, 7, int(time.time()) % 1000 + 1]
    feature_store.push(
        fs,
        "user_history_push",
        pd.DataFrame(
            {
                "user_id": [SMOKE_USER],
                "item_ids": [history],
                "history_len": [len(history)],
                "event_timestamp": [datetime.now(UTC)],
            }
        ),
        offline=False,
    )
    got = fs.get_online_features(
        features=fs.get_feature_service("serving_v1"), entity_rows=[{"user_id": SMOKE_USER}]
    ).to_dict()
    if got["item_ids"][0] != history:
        raise AssertionError(f"Feast returned {got['item_ids'][0]}, pushed {history}")
    return f"pushed and read back user {SMOKE_USER}'s history {history} (age {got['age'][0]})"


def _serve_round_trip(cfg: StackConfig) -> str:
    import ray

    from recloop import smoke_app as app

    connect(cfg)
    try:
        app.deploy()
        body = app.ping(cfg.ray.host, cfg.ray.serve_port, echo="hello")
        if body.get("echo") != "hello":
            raise AssertionError(f"unexpected answer from {app.ROUTE}: {body}")
        app.delete()
    finally:
        ray.shutdown()
    url = f"http://{cfg.ray.host}:{cfg.ray.serve_port}{app.ROUTE}"
    return f"GET {url} answered by replica {body['replica']}"


def run_smoke(cfg: StackConfig, say: Callable[[str], None] = print) -> bool:
    ok = True
    for name, step in (
        ("kafka", _kafka_round_trip),
        ("feast", _feast_round_trip),
        ("serve", _serve_round_trip),
    ):
        started = time.monotonic()
        try:
            detail = step(cfg)
            say(f"smoke {name}: ok in {time.monotonic() - started:.1f} s: {detail}")
        except Exception as exc:  # report every part, then fail
            ok = False
            say(f"smoke {name}: FAILED after {time.monotonic() - started:.1f} s: {exc!r}")
    return ok
