"""The DPO sample server's logic without Ray or Kafka: a real registry on disk with a tiny
OneRec policy and reward model, a producer that records what it is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.dpo_sampler import PreferenceMiner, select_pairs
from recloop.config import load_config
from recloop.events import Preference, decode, encode
from recloop.registry import reward_arm
from tests.unit.test_continuous import RAW, _tiny_checkpoint

ARM = "ipa"


def test_chosen_is_the_highest_reward_and_rejected_the_lowest():
    assert select_pairs([0.2, 0.9, -0.1, 0.5]) == [(1, 2)]
    assert select_pairs([1.0, 3.0, 3.0, 0.0, 0.0]) == [(1, 3)]  # first of equal ones
    assert select_pairs([0.4, 0.4, 0.4]) == []  # no preference among equals
    assert select_pairs([0.4]) == [] and select_pairs([]) == []


def test_several_pairs_pair_the_ith_best_with_the_ith_worst():
    r = [0.5, 0.9, 0.1, 0.7, 0.3, 0.0]
    assert select_pairs(r, 1) == [(1, 5)]
    assert select_pairs(r, 2) == [(1, 5), (3, 2)]
    assert select_pairs(r, 9) == [(1, 5), (3, 2), (0, 4)]  # at most n / 2, disjoint
    # Equal rewards in the middle end the pairs; ties go to the first index.
    assert select_pairs([2.0, 1.0, 1.0, 1.0, 0.0], 3) == [(0, 4)]
    assert select_pairs([1.0, 3.0, 3.0, 0.0, 0.0], 2) == [(1, 3), (2, 4)]
    assert select_pairs([0.4, 0.4], 4) == [] and select_pairs([], 4) == []


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, event) -> None:
        self.sent.append(decode(type(event), encode(event)))  # the contract holds

    def flush(self, timeout_s: float | None = None) -> None:
        pass


def _reward_ckpt(path: Path) -> Path:
    from models.reward import RewardConfig, SessionRewardModel
    from recloop.checkpoint import save_reward

    torch.manual_seed(0)
    model = SessionRewardModel(RewardConfig(num_items=len(RAW), max_history=8))
    with torch.no_grad():  # a fresh model starts neutral (zero branches): make it opinionated
        for p in model.parameters():
            p.normal_(std=0.3)
    return save_reward(path, model, RAW)


@pytest.fixture
def miner(tmp_path):
    from recloop.registry import ModelRegistry

    cfg = load_config(
        overrides={
            "home": str(tmp_path / "home"),
            "dpo.candidates": 4,
            "dpo.beam_width": 8,
            "dpo.pairs_per_request": 1,
            "dpo.queue_size": 5,
        },
        env={},
    )
    reg = ModelRegistry(cfg.registry_uri)
    reg.create_arm(ARM, ARM)
    reg.promote(ARM, reg.publish(ARM, _tiny_checkpoint(tmp_path / "p"), version="v1"))
    producer = Recorder()
    m = PreferenceMiner(cfg, [ARM], registry=reg, producer=producer, say=lambda _: None)
    return m, reg, producer, tmp_path


def _payload(i: int, arm: str = ARM) -> dict:
    return {
        "request_id": f"rq-{i}",
        "user_id": i,
        "arm": arm,
        "model_version": "v1",
        "event_time_ms": 1_700_000_000_000 + i,
        "history": [RAW[(i + j) % len(RAW)] for j in range(5)] + [999_999],  # one unknown id
        "items": [],
    }


def test_pairs_come_from_the_current_policy_and_reward_model(miner):
    m, reg, producer, tmp = miner
    m.refresh(force=True)
    assert m.offer(_payload(1)) and m.step(timeout_s=0.1) == 0  # no reward model yet
    assert m.counts["no_reward_model"] == 1 and not producer.sent

    name = reward_arm(ARM)
    reg.create_arm(name, name)
    reg.promote(name, reg.publish(name, _reward_ckpt(tmp / "rm"), version="rm1"))
    m.refresh(force=True)
    for i in range(2, 5):
        assert m.offer(_payload(i))
    assert not m.offer(_payload(9, arm="control"))  # another arm's request: not mined
    assert m.step(timeout_s=0.1) == 3
    prefs: list[Preference] = producer.sent
    assert [p.request_id for p in prefs] == ["rq-2", "rq-3", "rq-4"]
    for p in prefs:
        assert p.arm == ARM and p.model_version == "v1" and p.reward_version == "rm1"
        assert p.chosen_reward > p.rejected_reward and p.chosen != p.rejected
        assert p.candidates == 4 and p.event_time_ms == 1_700_000_000_000 + p.user_id
        assert set(p.chosen) <= set(RAW) and set(p.rejected) <= set(RAW)
        assert not set(p.chosen) & set(p.history)  # the history is excluded
        # chosen/rejected are the best/worst of the candidates by the reward model
        scores = m.rewards[ARM].score(p.history, [p.chosen, p.rejected])
        assert scores == pytest.approx([p.chosen_reward, p.rejected_reward], abs=1e-5)
    st = m.stats()
    assert (
        st["counts"]["other_arm"] == 1 and st["fraction_processed"] == 3 / 4
    )  # 1 waited for the RM
    assert st["cpu_s_per_request"] > 0 and st["policies"] == {ARM: "v1"}

    # A promotion is picked up at the next refresh; the pairs name the new version.
    reg.promote(ARM, reg.publish(ARM, _tiny_checkpoint(tmp / "p2", seed=1), version="v2"))
    m.refresh(force=True)
    m.offer(_payload(5))
    m.step(timeout_s=0.1)
    assert producer.sent[-1].model_version == "v2" and m.counts["reloads"] == 3


def test_a_request_gives_disjoint_pairs_from_the_ends_of_the_ranking_inwards(miner):
    m, reg, producer, tmp = miner
    m.cfg.dpo.pairs_per_request = 2
    name = reward_arm(ARM)
    reg.create_arm(name, name)
    reg.promote(name, reg.publish(name, _reward_ckpt(tmp / "rm"), version="rm1"))
    m.refresh(force=True)
    m.offer(_payload(2))
    assert m.step(timeout_s=0.1) == 2 == m.counts["emitted"] and m.counts["processed"] == 1
    outer, inner = producer.sent
    assert outer.request_id == inner.request_id == "rq-2" and outer.history == inner.history
    sessions = [outer.chosen, outer.rejected, inner.chosen, inner.rejected]
    assert len({tuple(x) for x in sessions}) == 4  # four different candidates
    # best > second best > second worst > worst, by the reward model
    assert outer.chosen_reward >= inner.chosen_reward > inner.rejected_reward
    assert inner.rejected_reward >= outer.rejected_reward
    scores = m.rewards[ARM].score(outer.history, sessions)
    assert scores == pytest.approx(
        [outer.chosen_reward, outer.rejected_reward, inner.chosen_reward, inner.rejected_reward],
        abs=1e-5,
    )


def test_a_full_queue_drops_instead_of_blocking_and_bad_weights_are_never_loaded(miner):
    m, reg, producer, tmp = miner
    accepted = [m.offer(_payload(i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3  # queue_size 5
    assert m.counts["dropped_full"] == 3
    m.refresh(force=True)
    assert m.policies[ARM].version == "v1"
    # A promoted version that cannot be loaded (here: its fetch fails verification) is
    # never swapped in; the sampler keeps mining on the previous weights.
    reg.promote(ARM, reg.publish(ARM, _tiny_checkpoint(tmp / "p2", seed=1), version="v2"))
    fetch = reg.fetch

    def corrupt(lineage, version, **kw):
        if version == "v2":
            raise ValueError("sha256 mismatch for model.safetensors")
        return fetch(lineage, version, **kw)

    m.registry.fetch = corrupt
    m.refresh(force=True)
    assert m.policies[ARM].version == "v1" and m.counts["errors"] == 1
    assert "sha256 mismatch" in m.stats()["last_error"]
