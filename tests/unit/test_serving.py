"""Serving logic without a cluster: request schema, DPO sampling, the loaded model's
sessions, the impression buffer, and the Serve deploy config kept in sync."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.offline.train_onerec import OneRecRanker
from recloop.config import PROJECT_ROOT, load_config
from serving.app import LoadedModel, RecommendRequest, mirrored, render_serve_config


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_checkpoint) -> Path:
    """A real checkpoint from the pre-training job on generated data: the run's first
    quick seed (built once per run; the integration tests serve it too)."""
    return synthetic_checkpoint


def test_request_schema_refuses_what_it_cannot_serve():
    assert RecommendRequest(user_id=3).exclude_seen is True
    for bad in (
        {},
        {"user_id": -1},
        {"user_id": "x"},
        {"user_id": 1, "session_size": 0},
        {"user_id": 1, "session_size": 1000},
        {"user_id": 1, "unknown": 1},
        {"user_id": 1, "context": {f"k{i}": "v" for i in range(17)}},
        {"user_id": 1, "context": {"k": "v" * 300}},
    ):
        with pytest.raises(ValidationError):
            RecommendRequest(**bad)


def test_dpo_mirroring_is_deterministic_and_near_its_fraction():
    ids = [f"req-{i}" for i in range(20_000)]
    picked = [r for r in ids if mirrored(r, 0.01)]
    assert picked == [r for r in ids if mirrored(r, 0.01)]
    assert 0.007 < len(picked) / len(ids) < 0.013
    assert not any(mirrored(r, 0.0) for r in ids[:1000])
    assert all(mirrored(r, 1.0) for r in ids[:1000])


def test_loaded_model_serves_distinct_real_items_outside_the_history(tiny_checkpoint):
    model = LoadedModel.load(str(tiny_checkpoint), "v1")
    known = set(model.to_model)
    history = sorted(known)[:20]
    reqs = [
        {"history": history, "session_size": None, "exclude_seen": True},
        {"history": [], "session_size": 2, "exclude_seen": True},  # cold start
        {"history": [10**9, *history[:3]], "session_size": None, "exclude_seen": False},
    ]
    out = model.generate(reqs, beam_width=8)
    assert [len(o["items"]) for o in out] == [model.session_len, 2, model.session_len]
    for o in out:
        ids = [i["item_id"] for i in o["items"]]
        assert len(set(ids)) == len(ids) and set(ids) <= known
        assert [i["position"] for i in o["items"]] == list(range(len(ids)))
        assert o["model_version"] == "v1"
    assert not set(i["item_id"] for i in out[0]["items"]) & set(history)


def test_a_cascade_arm_refuses_a_checkpoint_without_the_contrastive_head(tiny_checkpoint):
    with pytest.raises(ValueError, match="no contrastive head"):
        LoadedModel.load(str(tiny_checkpoint), "v1", scoring="cascade")


def test_a_cascade_arm_serves_distinct_real_items_outside_the_history():
    from tests.unit.test_cascade import N, head_model

    model, codes = head_model()
    ranker = OneRecRanker(model, codes)
    to_data = [0, *range(101, 101 + N)]  # data ids differ from model ids
    loaded = LoadedModel("v1", ranker, {d: m for m, d in enumerate(to_data) if m}, to_data, 3, 0.0)
    history = [101, 102, 103, 104]
    reqs = [{"history": history, "session_size": None, "exclude_seen": True}]
    beam = loaded.generate(reqs, beam_width=8)[0]
    (out,) = loaded.generate(reqs, 8, {"scoring": "cascade", "cascade_weight": 5.0})
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 3 == len(set(ids)) and set(ids) <= set(to_data[1:])
    assert not set(ids) & set(history)
    assert len(beam["items"]) == 3


def test_only_a_model_arm_can_serve_by_cascade():
    from recloop.experiment import ArmSpec

    assert ArmSpec(name="a", share=1.0, scoring="cascade").scoring_options() == {
        "scoring": "cascade",
        "cascade_weight": 1.0,
    }
    with pytest.raises(ValidationError, match="cascade"):
        ArmSpec(name="a", share=1.0, scoring="cascade", model="popularity")
    with pytest.raises(ValidationError, match="hybrid"):
        ArmSpec(name="a", share=1.0, scoring="hybrid", model="random")
    with pytest.raises(ValidationError):
        ArmSpec(name="a", share=1.0, scoring="magic")


def test_a_hybrid_arm_reranks_the_beams_by_the_next_item_head():
    """scoring: hybrid re-ranks every beam's items by log p_SID + w · the next-item head's
    log-softmax over them; a large weight follows the head's order among the proposals."""
    import torch

    from models.beam_search import beam_search
    from models.cascade import rerank_beams
    from tests.unit.test_cascade import N, head_model

    model, codes = head_model(next_item_weight=1.0)
    ranker = OneRecRanker(model, codes)
    to_data = [0, *range(101, 101 + N)]
    loaded = LoadedModel("v1", ranker, {d: m for m, d in enumerate(to_data) if m}, to_data, 3, 0.0)
    history = [101, 102, 103, 104]
    reqs = [{"history": history, "session_size": None, "exclude_seen": True}]
    (out,) = loaded.generate(reqs, 8, {"scoring": "hybrid", "cascade_weight": 1000.0})
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 3 == len(set(ids)) and set(ids) <= set(to_data[1:])
    assert not set(ids) & set(history)
    hist = [[1, 2, 3, 4]]
    enc = ranker.encode(hist)
    beams = beam_search(model, enc, ranker.trie, 8, exclude=hist)
    proposed = {i for i in beams.items[0].flatten().tolist() if i > 0}
    head = model.next_item_logits(enc)[0]
    by_head = sorted(proposed, key=lambda i: -float(head[i]))[:3]
    assert [i - 100 for i in ids] == by_head
    with pytest.raises(ValueError, match="unknown head"):
        rerank_beams(model, enc, beams, codes, head="magic")
    assert torch.isfinite(torch.tensor([i["score"] for i in out["items"]])).all()


def test_serve_deploy_config_in_infra_matches_what_recloop_serve_deploys():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config(env={})
    shipped = yaml.safe_load((PROJECT_ROOT / "infra" / "serve" / "config.yaml").read_text())
    assert shipped == render_serve_config(cfg), "regenerate infra/serve/config.yaml"
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(shipped)  # Serve itself accepts the file


def test_trainers_with_their_own_settings_deploy_the_same_service_args(tmp_path):
    """Serve restarts every replica when the app's args change: two trainers (one per
    learning arm, with their own train/dpo settings) must promote the same args."""
    from serving.app import deploy_config

    reg = str(tmp_path / "registry")
    a = load_config(overrides={"serve.registry_uri": reg, "train.arm": "online"}, env={})
    b = load_config(
        overrides={
            "serve.registry_uri": reg,
            "train.arm": "online-ipa",
            "train.dpo": True,
            "dpo.beta": 0.5,
            "ingest.consumers": 2,
        },
        env={},
    )
    args_a = deploy_config(a, versions={})["applications"][0]["args"]
    args_b = deploy_config(b, versions={})["applications"][0]["args"]
    assert args_a == args_b
    c = load_config(overrides={"serve.registry_uri": reg, "serve.dpo_fraction": 0.05}, env={})
    assert deploy_config(c, versions={})["applications"][0]["args"] != args_a  # serve's own


def test_impression_logger_counts_drops_when_its_buffer_is_full():
    from recloop.events import Impression
    from serving.impressions import ImpressionLogger

    # Nothing listens on this port: events wait in the buffer, the overflow is counted.
    logger = ImpressionLogger("127.0.0.1:1", capacity=5)
    ev = Impression(
        event_time_ms=1,
        request_id="r",
        user_id=1,
        arm="a",
        model_version="v",
        items=[{"item_id": 1, "position": 0, "score": -1.0}],
    )
    accepted = [logger.offer(ev) for _ in range(50)]
    stats = logger.stats()
    assert stats["offered"] == 50
    assert stats["dropped"] == accepted.count(False) and stats["dropped"] >= 40
    logger.close(timeout_s=0.5)


def test_impression_logger_resends_what_the_producer_gave_up_and_skips_what_breaks_the_contract(
    monkeypatch,
):
    import recloop.kafka_io
    from recloop.events import Impression
    from serving import impressions

    class Future:
        def __init__(self, error: Exception | None):
            self.exception = error

        def failed(self) -> bool:
            return self.exception is not None

    delivered: list[str] = []
    made: list[int] = []

    class Producer:  # the first producer loses every other record, later ones none
        def __init__(self, *_a, **_k):
            made.append(1)
            self.n = len(made)
            self.i = 0

        def send(self, ev):
            if ev.request_id == "poison":
                raise ValueError("breaks the contract")
            self.i += 1
            if self.n == 1 and self.i % 2:
                return Future(RuntimeError("OutOfOrderSequenceNumber"))
            delivered.append(ev.request_id)
            return Future(None)

        def flush(self, timeout_s=None):
            pass

        def close(self, timeout_s=None):
            pass

    monkeypatch.setattr(recloop.kafka_io, "EventProducer", Producer)
    monkeypatch.setattr(impressions, "SEND_ATTEMPTS", 3)
    logger = impressions.ImpressionLogger("unused:1", capacity=100)

    def ev(rid: str) -> Impression:
        return Impression(
            event_time_ms=1,
            request_id=rid,
            user_id=1,
            arm="a",
            model_version="v",
            items=[{"item_id": 1, "position": 0, "score": -1.0}],
        )

    for i in range(10):
        logger.offer(ev(f"r{i}"))
    logger.offer(ev("poison"))
    deadline = time.monotonic() + 10
    while logger.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = logger.stats()
    logger.close(timeout_s=1)
    assert sorted(delivered) == sorted(f"r{i}" for i in range(10))  # each once
    assert (stats["sent"], stats["failed"], stats["dropped"], stats["pending"]) == (10, 1, 0, 0)
    assert stats["send_errors"] >= 1 and len(made) >= 2


def test_an_unreachable_feature_store_degrades_to_cold_start_and_backs_off():
    import asyncio

    from serving.features import FeatureClient

    class Broken:
        calls = 0

        def get_online_features(self, **_):
            Broken.calls += 1
            raise ConnectionError("store down")

    client = FeatureClient(load_config(env={}), timeout_s=0.5, backoff_s=60)
    client._store = Broken()
    client._lookup = client._lookup_reference  # the fake answers Feast's own API
    got = [asyncio.run(client.user(7)) for _ in range(5)]
    assert all(g.history == [] and g.source == "degraded" for g in got)
    assert Broken.calls == 1  # the back-off spares the store (and the requests)
    assert client.stats()["errors"] == 1 and client.stats()["skipped"] == 4
    assert "store down" in client.stats()["last_error"]


def test_a_hanging_store_gets_one_lookup_at_a_time_and_requests_do_not_wait_for_it():
    """Concurrent requests against a store that hangs (a locked SQLite file): each gets a
    degraded answer within the timeout, and only one lookup ever runs; the queued ones
    are cancelled unrun instead of piling onto the store's one connection."""
    import asyncio
    import threading

    from serving.features import FeatureClient

    release = threading.Event()

    class Hanging:
        running = 0
        most = 0
        calls = 0

        def get_online_features(self, **_):
            Hanging.calls += 1
            Hanging.running += 1
            Hanging.most = max(Hanging.most, Hanging.running)
            release.wait(10)
            Hanging.running -= 1
            raise TimeoutError("database is locked")

    client = FeatureClient(load_config(env={}), timeout_s=0.3, backoff_s=0)
    client._store = Hanging()
    client._lookup = client._lookup_reference  # the fake answers Feast's own API

    async def burst():
        return await asyncio.gather(*(client.user(u) for u in range(8)))

    got = asyncio.run(burst())
    release.set()
    assert all(g.source == "degraded" for g in got)
    assert Hanging.most == 1 and Hanging.calls == 1
    assert client.stats()["errors"] == 8


def test_a_new_replica_whose_version_rotted_serves_the_last_good_one(tiny_checkpoint, tmp_path):
    """A replica started after the deployed version went bad (a restart, a scale-up) has
    no model to keep: it serves the newest version of the arm's history that loads."""
    import asyncio

    from recloop.registry import ModelRegistry
    from serving.app import Recommender

    reg = ModelRegistry(str(tmp_path / "registry"))
    reg.create_arm("treatment", "treatment")
    good = reg.publish("treatment", tiny_checkpoint, version="good")
    reg.promote("treatment", good)
    bad = reg.publish("treatment", tiny_checkpoint, version="bad")
    reg.promote("treatment", bad)
    weights = tmp_path / "registry" / "lineages" / "treatment" / bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))

    cfg = load_config(overrides={"serve.registry_uri": str(tmp_path / "registry")}, env={})
    replica = Recommender.func_or_class(cfg.to_dict(), "treatment", "treatment")
    asyncio.run(replica.reconfigure({"version": bad}))
    info = replica.info()
    assert info["model_version"] == good
    assert bad in info["load_error"] and f"serving {good} instead" in info["load_error"]
    # a running replica keeps what it serves, with no fallback hunt
    asyncio.run(replica.reconfigure({"version": bad}))
    assert replica.info()["model_version"] == good


def test_the_inline_topology_deploys_one_router_that_holds_every_arms_version(tmp_path):
    from serving.app import deploy_config, render_serve_config

    reg = str(tmp_path / "registry")
    cfg = load_config(overrides={"serve.registry_uri": reg, "serve.topology": "inline"}, env={})
    app = deploy_config(cfg, versions={"control": "v1", "treatment": "v2"})["applications"][0]
    (router,) = app["deployments"]  # no Recommender deployments
    assert router["name"] == "Router"
    assert router["user_config"] == {"versions": {"control": "v1", "treatment": "v2"}}
    s = cfg.serve
    assert router["ray_actor_options"]["num_cpus"] == pytest.approx(s.router_cpus + s.replica_cpus)
    assert app["logging_config"] == {"enable_access_log": False}
    split = render_serve_config(load_config(overrides={"serve.registry_uri": reg}, env={}))
    names = [d["name"] for d in split["applications"][0]["deployments"]]
    assert names == ["Router", "recommender-control", "recommender-treatment"]
    with pytest.raises(ValueError, match="topology"):
        load_config(overrides={"serve.topology": "merged"}, env={})


def test_a_replicas_batch_limit_follows_its_user_config_in_place(tmp_path):
    """``max_batch`` in a Recommender's (or the inline Router's engines') user_config sets
    the running batcher's limit; without it the limit is serve.max_batch_size again."""
    import asyncio

    from serving.app import Recommender

    cfg = load_config(overrides={"serve.registry_uri": str(tmp_path / "registry")}, env={})
    replica = Recommender.func_or_class(cfg.to_dict(), "treatment", "treatment")
    assert replica.engine.batcher.max_batch == cfg.serve.max_batch_size == 16
    asyncio.run(replica.reconfigure({"version": None, "max_batch": 1}))
    assert replica.engine.batcher.max_batch == 1
    asyncio.run(replica.reconfigure({"version": None}))
    assert replica.engine.batcher.max_batch == 16
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        asyncio.run(replica.reconfigure({"version": None, "max_batch": 0}))
