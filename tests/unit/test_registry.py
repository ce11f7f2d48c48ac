"""The model registry: publish/fetch with verification, and per-arm promote/rollback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from recloop.registry import COMPLETE_MARKER, ModelRegistry, RegistryError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny but real OneRec checkpoint written by save_checkpoint."""
    from models.onerec import OneRec, OneRecConfig
    from models.tokenizer import SemanticIdTokenizer, TokenizerConfig
    from recloop.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = OneRecConfig(
        levels=2,
        codebook_size=4,
        session_len=2,
        max_history=4,
        dim=16,
        heads=2,
        enc_layers=1,
        dec_layers=1,
        ffn_hidden=32,
        moe_experts=2,
        moe_top_k=1,
        dropout=0.0,
    )
    tok = SemanticIdTokenizer.fit(
        torch.randn(12, 4), list(range(1, 13)), TokenizerConfig(levels=2, codebook_size=4, seed=0)
    )
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ck", OneRec(cfg).eval(), tok, {"step": 1}
    )


@pytest.fixture
def reg(tmp_path) -> ModelRegistry:
    return ModelRegistry(str(tmp_path / "registry"))


def _remote(tmp_path: Path) -> ModelRegistry:
    """A registry through a non-LocalFileSystem wrapper: exercises the object-store path."""
    root = tmp_path / "remote"
    root.mkdir(exist_ok=True)
    return ModelRegistry("", filesystem=pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))


# ------------------------------------------------------------------------------- publish/fetch
def test_publish_list_fetch_and_load(reg, checkpoint):
    from recloop.checkpoint import load_checkpoint

    v = reg.publish("treatment", checkpoint, metrics={"recall@10": 0.25})
    assert v.startswith("v") and reg.versions("treatment") == [v]
    vdir = Path(reg.uri) / "lineages" / "treatment" / v
    assert sorted(p.name for p in vdir.iterdir()) == [
        COMPLETE_MARKER,
        "config.json",
        "metrics.json",
        "model.safetensors",
        "tokenizer.safetensors",
    ]
    manifest = json.loads((vdir / COMPLETE_MARKER).read_text())
    assert manifest["version"] == v and manifest["lineage"] == "treatment"
    assert (
        manifest["files"]["model.safetensors"]["size"]
        == (vdir / "model.safetensors").stat().st_size
    )
    # no staging directory left behind
    assert [p.name for p in vdir.parent.iterdir()] == [v]

    path = reg.fetch("treatment", v)
    assert path == vdir
    ck = load_checkpoint(path)
    assert ck.meta["step"] == 1
    assert reg.metrics("treatment", v) == {"recall@10": 0.25}

    v2 = reg.publish("treatment", checkpoint, version="v2")
    assert reg.versions("treatment") == [v, v2]  # publish order
    assert reg.metrics("treatment", v2) == {}
    assert reg.versions("control") == [] and reg.lineages() == ["treatment"]


def test_staging_and_incomplete_versions_are_invisible(reg, checkpoint):
    reg.publish("t", checkpoint, version="good")
    lineage_dir = Path(reg.uri) / "lineages" / "t"
    staging = lineage_dir / ".staging-x-abcd"
    shutil.copytree(lineage_dir / "good", staging)  # even with a marker, hidden is hidden
    partial = lineage_dir / "partial"
    shutil.copytree(lineage_dir / "good", partial)
    (partial / COMPLETE_MARKER).unlink()
    assert reg.versions("t") == ["good"]
    with pytest.raises(RegistryError, match="incomplete"):
        reg.fetch("t", "partial")
    with pytest.raises(RegistryError, match="no version 'nope'.*good"):
        reg.fetch("t", "nope")
    with pytest.raises(RegistryError, match="incomplete"):
        reg.metrics("t", "partial")


def test_corrupted_files_are_caught_at_fetch(reg, checkpoint):
    reg.publish("t", checkpoint, version="v1")
    f = Path(reg.uri) / "lineages" / "t" / "v1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.safetensors does not match"):
        reg.fetch("t", "v1")
    f.write_bytes(bytes(data[:-1]))  # truncated
    with pytest.raises(RegistryError, match="corrupt"):
        reg.fetch("t", "v1")
    f.unlink()
    with pytest.raises(RegistryError, match="missing"):
        reg.fetch("t", "v1")


def test_bad_checkpoints_and_names_are_refused(reg, checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    shutil.copytree(checkpoint, nan)
    weights = load_file(str(nan / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(nan / "model.safetensors"))
    with pytest.raises(RegistryError, match="refusing to publish.*non-finite"):
        reg.publish("t", nan, version="bad")
    assert reg.versions("t") == []
    assert not (Path(reg.uri) / "lineages" / "t" / "bad").exists()

    incomplete = tmp_path / "incomplete"
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "tokenizer.safetensors").unlink()
    with pytest.raises(RegistryError, match="missing tokenizer.safetensors"):
        reg.publish("t", incomplete)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.publish("t", tmp_path / "nowhere")

    reg.publish("t", checkpoint, version="v1")
    with pytest.raises(RegistryError, match="already exists"):
        reg.publish("t", checkpoint, version="v1")
    with pytest.raises(RegistryError, match="NaN|finite"):
        reg.publish("t", checkpoint, version="v2", metrics={"loss": float("nan")})

    for lineage, version in [
        ("Bad", "v1"),
        ("t", "../x"),
        ("t", ".hidden"),
        ("a/b", "v"),
        ("", "v"),
    ]:
        with pytest.raises(RegistryError, match="invalid .* name"):
            reg.publish(lineage, checkpoint, version=version)
    with pytest.raises(RegistryError, match="invalid arm name"):
        reg.create_arm("A B", "t")
    assert reg.versions("t") == ["v1"]


def test_a_crash_during_publish_leaves_nothing_visible(reg, checkpoint, tmp_path, monkeypatch):
    def crash(src, dest):
        raise OSError("network down")

    for r in (reg, _remote(tmp_path)):
        monkeypatch.setattr(r, "_upload", crash)
        with pytest.raises(OSError, match="network down"):
            r.publish("t", checkpoint, version="v1")
        monkeypatch.undo()
        assert r.versions("t") == []
    # local: the staging directory is gone, so the name is free again
    assert list((Path(reg.uri) / "lineages" / "t").iterdir()) == []
    assert reg.publish("t", checkpoint, version="v1") == "v1"
    # object store: the torn version stays invisible and its name is refused with a reason
    with pytest.raises(RegistryError, match="incomplete"):
        _remote(tmp_path).publish("t", checkpoint, version="v1")


# ------------------------------------------------------------------------------- arms
def test_promote_rollback_and_history(reg, checkpoint):
    for v in ("v1", "v2", "v3"):
        reg.publish("treatment", checkpoint, version=v)
    rec = reg.create_arm("treatment", "treatment")
    assert rec == {"arm": "treatment", "lineage": "treatment", "current": None, "history": []}
    assert reg.create_arm("treatment", "treatment")["lineage"] == "treatment"  # idempotent
    with pytest.raises(RegistryError, match="already exists with lineage 'treatment'"):
        reg.create_arm("treatment", "control")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("treatment")

    reg.promote("treatment", "v1")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("treatment")
    reg.promote("treatment", "v2")
    rec = reg.rollback("treatment")
    assert rec["current"] == "v1" == reg.current("treatment")
    hist = reg.history("treatment")
    assert [(h["action"], h["version"], h["previous"]) for h in hist] == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("rollback", "v1", "v2"),
    ]
    assert all(h["at"] for h in hist)
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("treatment")  # v2 was rolled away from; it is not re-served

    # successive rollbacks walk back through promotions
    reg.promote("treatment", "v2")
    reg.promote("treatment", "v3")
    assert reg.rollback("treatment")["current"] == "v2"
    assert reg.rollback("treatment")["current"] == "v1"
    assert len(reg.history("treatment")) == 7
    assert reg.promote("treatment", "v1")["current"] == "v1"  # already current: no-op
    assert len(reg.history("treatment")) == 7


def test_promote_refuses_unknown_versions_and_arms(reg, checkpoint):
    reg.publish("control", checkpoint, version="v1")
    reg.publish("treatment", checkpoint, version="t1")
    reg.create_arm("control", "control")
    with pytest.raises(RegistryError, match="no version 'v9'.*v1"):
        reg.promote("control", "v9")
    with pytest.raises(RegistryError, match="no version 't1'"):
        reg.promote("control", "t1")  # complete, but in another lineage
    with pytest.raises(RegistryError, match=r"unknown arm 'nope'.*\['control'\]"):
        reg.promote("nope", "v1")
    with pytest.raises(RegistryError, match="unknown arm"):
        reg.current("nope")
    assert reg.current("control") is None
    reg.promote("control", "v1")
    reg.create_arm("treatment", "treatment")
    arms = reg.arms()
    assert sorted(arms) == ["control", "treatment"]
    assert arms["control"]["current"] == "v1" and arms["treatment"]["current"] is None
    assert reg.arm("control") == arms["control"]


_PROMOTER = """
import sys
from recloop.registry import ModelRegistry
reg = ModelRegistry(sys.argv[1])
versions = sys.argv[2].split(",")
for i in range(int(sys.argv[3])):
    reg.promote("a", versions[i % 2])  # alternate, so every call really writes
    assert reg.current("a") in versions  # a torn file would fail to parse here
"""


def test_concurrent_promotes_from_two_processes_never_corrupt_the_arm(reg, checkpoint):
    reg.publish("l", checkpoint, version="v1")
    reg.publish("l", checkpoint, version="v2")
    reg.create_arm("a", "l")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROMOTER, reg.uri, vs, "40"],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
        )
        for vs in ("v1,v2", "v2,v1")
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    rec = reg.arm("a")  # parses: never a torn file
    assert rec["current"] in {"v1", "v2"}
    assert 2 <= len(rec["history"]) <= 80  # last writer wins: some updates may be lost
    assert not [p for p in (Path(reg.uri) / "arms").iterdir() if p.name != "a.json"]


def test_a_crash_while_writing_an_arm_leaves_the_previous_record_intact(
    reg, checkpoint, monkeypatch
):
    reg.publish("l", checkpoint, version="v1")
    reg.publish("l", checkpoint, version="v2")
    reg.create_arm("a", "l")
    reg.promote("a", "v1")
    write = reg._write_bytes

    def torn(path: str, data: bytes) -> None:
        write(path, data[:10])  # half a record reaches the disk, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(reg, "_write_bytes", torn)
    with pytest.raises(OSError, match="disk full"):
        reg.promote("a", "v2")
    monkeypatch.undo()
    assert reg.current("a") == "v1" and len(reg.history("a")) == 1
    assert [p.name for p in (Path(reg.uri) / "arms").iterdir()] == ["a.json"]  # temp removed


# ------------------------------------------------------------------------------- backends
def test_file_uri_and_plain_path_see_the_same_registry(tmp_path, checkpoint):
    plain = ModelRegistry(str(tmp_path / "r"))
    v = plain.publish("t", checkpoint)
    via_uri = ModelRegistry((tmp_path / "r").as_uri())
    assert via_uri.uri.startswith("file://")
    assert via_uri.versions("t") == [v]
    assert via_uri.fetch("t", v) == tmp_path / "r" / "lineages" / "t" / v
    via_uri.create_arm("t", "t")
    via_uri.promote("t", v)
    assert plain.current("t") == v
    with pytest.raises(RegistryError, match="cannot open registry URI"):
        ModelRegistry("nosuchscheme://x")


def test_non_local_filesystem_path(tmp_path, checkpoint):
    from recloop.checkpoint import load_checkpoint

    reg = _remote(tmp_path)
    v = reg.publish("t", checkpoint, version="v1", metrics={"ndcg": 0.1})
    # written in place, no staging directory
    assert [p.name for p in (tmp_path / "remote" / "lineages" / "t").iterdir()] == ["v1"]
    assert reg.versions("t") == [v]
    cache = tmp_path / "cache"
    path = reg.fetch("t", v, cache_dir=cache)
    assert path == cache / "t" / "v1"
    assert load_checkpoint(path).meta["step"] == 1
    assert sorted(p.name for p in cache.joinpath("t").iterdir()) == ["v1"]  # no temp left
    assert reg.fetch("t", v, cache_dir=cache) == path  # cached copy re-verified and reused
    assert reg.metrics("t", v) == {"ndcg": 0.1}

    # a damaged cache is replaced by a fresh verified download
    (path / "config.json").write_text("{}")
    assert load_checkpoint(reg.fetch("t", v, cache_dir=cache)).meta["step"] == 1

    # default cache dir: a temp directory
    tmp_fetch = reg.fetch("t", v)
    assert tmp_fetch != path and (tmp_fetch / "model.safetensors").is_file()
    shutil.rmtree(tmp_fetch.parents[1], ignore_errors=True)

    # corruption in the store is caught, and nothing is left in the cache
    remote_file = tmp_path / "remote" / "lineages" / "t" / "v1" / "tokenizer.safetensors"
    remote_file.write_bytes(remote_file.read_bytes()[:-1] + b"\x00")
    shutil.rmtree(cache)
    with pytest.raises(RegistryError, match="tokenizer.safetensors does not match"):
        reg.fetch("t", v, cache_dir=cache)
    assert list(cache.joinpath("t").iterdir()) == []

    # arms work the same
    reg.create_arm("t", "t")
    assert reg.promote("t", "v1")["current"] == "v1"
    assert reg.arms()["t"]["current"] == "v1"


def test_promotion_verifies_the_version_before_the_pointer_moves(tmp_path, checkpoint):
    from recloop.config import load_config
    from recloop.registry import open_registry
    from serving.api import promote

    cfg = load_config(overrides={"serve.registry_uri": str(tmp_path / "reg")}, env={})
    reg = open_registry(cfg)
    reg.create_arm("a", "lin")
    good = reg.publish("lin", checkpoint, version="good")
    reg.promote("a", good)
    bad = reg.publish("lin", checkpoint, version="bad")
    f = Path(reg.uri) / "lineages" / "lin" / bad / "tokenizer.safetensors"
    f.write_bytes(f.read_bytes()[:-1])  # truncated after publication
    with pytest.raises(RegistryError, match="corrupt|does not match"):
        promote(cfg, "a", bad, progress=lambda _: None)  # refused before any deploy
    assert reg.current("a") == "good"


def test_promotions_of_different_arms_take_turns_and_each_deploys_the_other(tmp_path, monkeypatch):
    """Each arm's trainer promotes on its own; a promotion redeploys the service from the
    registry. Two at once would deploy a registry read from before the other's
    promotion (putting that arm back): ``promote`` holds the stack's promotion lock from
    the registry write to the end of the redeploy."""
    import threading
    import time

    from recloop.config import load_config
    from serving import api

    cfg = load_config(overrides={"home": str(tmp_path / "home")}, env={})
    current: dict[str, str] = {}
    deployed: list[dict] = []
    inside: list[int] = []

    class Registry:  # the registry's promote and current, in memory
        def promote(self, arm, version):
            current[arm] = version
            return {"arm": arm, "current": version}

    def redeploy(cfg, progress):  # a deploy reads every arm's current version, then waits
        inside.append(1)
        assert len(inside) == 1, "two redeploys at once"
        snapshot = dict(current)
        time.sleep(0.2)  # the wait for the replicas
        deployed.append(snapshot)
        inside.pop()

    monkeypatch.setattr(api, "open_registry", lambda cfg: Registry())
    monkeypatch.setattr(api, "verify_version", lambda cfg, arm, version: None)
    monkeypatch.setattr(api, "_redeploy", redeploy)
    threads = [
        threading.Thread(target=api.promote, args=(cfg, arm, f"{arm}-v1", lambda m: None))
        for arm in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(deployed) == 2 and not inside
    # the second deploy holds both promotions: neither arm was put back
    assert deployed[-1] == {"a": "a-v1", "b": "b-v1"}
