"""Throughput of recloop's event helpers against a real broker, beside a baseline.

Starts its own broker (temporary home, free ports, the shared jar cache), then measures:

- produce: ``EventProducer.send`` (contract check + JSON + acks=all, idempotent) versus
  raw kafka-python sending the same pre-encoded bytes with the same settings;
- consume: ``EventConsumer.poll`` (decode + validate) with a commit per batch versus a
  raw ``KafkaConsumer`` reading the same topic with a commit per batch.

The ratios (helper / raw) are the figures to compare across machines; absolute rates
move with the machine's load. Results are printed and saved as JSON.

    make bench-kafka            # or: .venv/bin/python -m benchmarks.kafka_throughput
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from recloop.broker import KafkaBroker
from recloop.config import PROJECT_ROOT, load_config
from recloop.events import Interaction, encode
from recloop.kafka_io import EventConsumer, EventProducer
from recloop.procs import free_port

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def make_events(n: int) -> list[Interaction]:
    return [
        Interaction(
            event_time_ms=1_700_000_000_000 + i,
            request_id=f"req-{i // 5}",
            user_id=i % 943,
            item_id=i % 1682,
            position=i % 5,
            arm="online",
            model_version="v12",
            clicked=i % 3 == 0,
            watch_time_s=float(i % 300) if i % 3 == 0 else 0.0,
            liked=i % 9 == 0,
            followed=i % 27 == 0,
        )
        for i in range(n)
    ]


def bench_produce(bootstrap: str, topic: str, events: list[Interaction], helper: bool) -> float:
    started = time.perf_counter()
    if helper:
        with EventProducer(bootstrap) as producer:
            for ev in events:
                producer.send(ev, topic=topic)
            producer.flush()
    else:
        payloads = [(ev.key, ev.model_dump_json().encode()) for ev in events]
        started = time.perf_counter()  # the baseline gets its encoding for free
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            batch_size=128 * 1024,
        )
        for key, value in payloads:
            producer.send(topic, key=key, value=value)
        producer.flush()
        producer.close()
    return len(events) / (time.perf_counter() - started)


def bench_consume(bootstrap: str, topic: str, n: int, helper: bool) -> float:
    group = f"bench-{'helper' if helper else 'raw'}-{topic}"
    got = 0
    if helper:
        consumer = EventConsumer(bootstrap, {topic: Interaction}, group_id=group)
        consumer.poll(timeout_ms=100)  # join the group before the clock starts
        started = time.perf_counter()
        while got < n:
            got += len(consumer.poll(timeout_ms=1000))
            consumer.commit()
        rate = got / (time.perf_counter() - started)
        consumer.close()
    else:
        raw = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
        )
        raw.poll(timeout_ms=100)
        started = time.perf_counter()
        while got < n:
            got += sum(len(v) for v in raw.poll(timeout_ms=1000).values())
            raw.commit()
        rate = got / (time.perf_counter() - started)
        raw.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "kafka_throughput.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="rl-bench-", dir="/tmp"))
    cfg = load_config(
        overrides={
            "home": str(home),
            "cache_dir": str(PROJECT_ROOT / ".recloop" / "cache"),
            "kafka.port": free_port(),
            "kafka.controller_port": free_port(),
        },
        env={},
    )
    broker = KafkaBroker(cfg)
    try:
        print(f"broker: {broker.start(print)}", flush=True)
        bootstrap = cfg.kafka.bootstrap
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        topics = {kind: f"bench.{kind}" for kind in ("helper", "raw")}
        admin.create_topics([NewTopic(t, args.partitions, 1) for t in topics.values()])
        admin.close()

        events = make_events(args.events)
        avg_bytes = sum(len(encode(e)) for e in events[:1000]) / 1000
        # Warm up connections and the JIT of the broker on a throw-away run.
        bench_produce(bootstrap, topics["raw"], events[:2000], helper=False)
        result = {
            "events": args.events,
            "partitions": args.partitions,
            "avg_event_bytes": round(avg_bytes, 1),
            "produce_helper_per_s": bench_produce(bootstrap, topics["helper"], events, True),
            "produce_raw_per_s": bench_produce(bootstrap, topics["raw"], events, False),
            "consume_helper_per_s": bench_consume(bootstrap, topics["helper"], args.events, True),
            "consume_raw_per_s": bench_consume(bootstrap, topics["raw"], args.events + 2000, False),
        }
        result["produce_ratio"] = result["produce_helper_per_s"] / result["produce_raw_per_s"]
        result["consume_ratio"] = result["consume_helper_per_s"] / result["consume_raw_per_s"]
        result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        result["machine"] = {
            "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "kafka": broker.version,
        }
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
