"""Non-learned A/B arms (popularity, random): checkpoints, the registry, serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recloop.checkpoint import (
    BASELINE_FORMAT,
    CheckpointError,
    load_baseline,
    save_baseline,
    validate_checkpoint,
)
from recloop.registry import ModelRegistry, RegistryError
from serving.app import BaselineModel, LoadedModel

IDS = [10, 20, 30, 40, 50, 60]
COUNTS = torch.tensor([5.0, 60.0, 1.0, 30.0, 0.0, 12.0])


def _req(history=(), size=None, exclude=True) -> dict:
    return {"history": list(history), "session_size": size, "exclude_seen": exclude}


@pytest.fixture
def popularity(tmp_path: Path) -> Path:
    return save_baseline(tmp_path / "pop", "popularity", IDS, COUNTS, session_len=3)


def test_popularity_serves_the_most_popular_unseen_items(popularity: Path):
    model = LoadedModel.load(str(popularity), "v1")
    assert isinstance(model, BaselineModel)
    (out,) = model.generate([_req()], beam_width=32)
    assert [i["item_id"] for i in out["items"]] == [20, 40, 60]
    assert [i["position"] for i in out["items"]] == [0, 1, 2]
    (out,) = model.generate([_req(history=[20, 60], size=4)], beam_width=32)
    assert [i["item_id"] for i in out["items"]] == [40, 10, 30, 50]
    (out,) = model.generate([_req(history=[20], exclude=False)], beam_width=32)
    assert out["items"][0]["item_id"] == 20
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)


def test_random_slates_are_uniform_valid_and_fresh(tmp_path: Path):
    path = save_baseline(tmp_path / "rnd", "random", IDS, torch.zeros(6), session_len=3)
    model = LoadedModel.load(str(path), "v1")
    outs = model.generate([_req(history=[10, 20]) for _ in range(200)], beam_width=1)
    seen = set()
    for out in outs:
        ids = [i["item_id"] for i in out["items"]]
        assert len(ids) == len(set(ids)) == 3 and not {10, 20} & set(ids)
        seen.add(tuple(ids))
    assert len(seen) > 10
    # a history that covers almost everything leaves a shorter, still valid slate
    (out,) = model.generate([_req(history=IDS[:5])], beam_width=1)
    assert [i["item_id"] for i in out["items"]] == [60] and out["items"][0]["position"] == 0


def test_bad_baselines_are_refused(tmp_path: Path, popularity: Path):
    with pytest.raises(CheckpointError, match="kind"):
        save_baseline(tmp_path / "x", "best", IDS, COUNTS)
    with pytest.raises(CheckpointError, match="item ids"):
        save_baseline(tmp_path / "y", "popularity", IDS[:3], COUNTS)
    nan = save_baseline(tmp_path / "nan", "popularity", IDS, COUNTS)
    from safetensors.torch import save_file

    save_file({"scores": torch.tensor([float("nan")] * 6)}, str(nan / "model.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_baseline(nan)
    cfg = json.loads((popularity / "config.json").read_text())
    assert cfg["format"] == BASELINE_FORMAT
    (popularity / "config.json").write_text(json.dumps({**cfg, "item_ids": [1, 2]}))
    with pytest.raises(CheckpointError, match="item_ids"):
        validate_checkpoint(popularity)


def test_the_registry_publishes_baselines_and_refuses_broken_ones(tmp_path: Path, popularity):
    reg = ModelRegistry(str(tmp_path / "registry"))
    version = reg.publish("pop", popularity)
    fetched = reg.fetch("pop", version)
    assert load_baseline(fetched).item_ids == IDS
    bad = save_baseline(tmp_path / "bad", "popularity", IDS, COUNTS)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RegistryError, match="refusing to publish"):
        reg.publish("pop", bad)
