"""OneRec checkpoints on disk: safetensors + JSON, written whole, then made visible.

A checkpoint is a directory::

    model.safetensors       the model's weights
    tokenizer.safetensors   the semantic-ID tokenizer (codebooks, item ids, codes)
    config.json             model + tokenizer + training config, metrics, provenance

It is written into a hidden sibling directory and renamed into place, so a reader sees
either nothing or the whole checkpoint. Loading refuses non-finite weights and any shape
or key mismatch: bad weights are never served. No pickle anywhere.

Two other formats share the layout minus the tokenizer: baseline arms
(``recloop.baseline/1``) and session reward models (``recloop.reward/1``, OneRec §3.3.1,
``models/reward``). ``FILES`` lists each format's files and ``validate_checkpoint``
loads any of them, which is what the model registry checks before publishing.

Ground floor (``recloop/``, on ``models/`` only): the trainer writes checkpoints, the
registry validates them, serving and the DPO sampler load them (``recloop.inference``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.onerec import OneRec, OneRecConfig
from models.reward import RewardConfig, SessionRewardModel
from models.tokenizer import SemanticIdTokenizer
from recloop.context import ContextBuilder

FORMAT = "recloop.onerec/2"  # 2: causal encoder, decoder conditioned on its summary


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded; the message says why."""


@dataclass
class Checkpoint:
    model: OneRec
    tokenizer: SemanticIdTokenizer
    meta: dict
    path: Path


def save_checkpoint(
    path: str | os.PathLike[str],
    model: OneRec,
    tokenizer: SemanticIdTokenizer,
    meta: dict | None = None,
) -> Path:
    """Write the checkpoint directory ``path`` atomically (it must not exist yet)."""
    with _staged_dir(path) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        tok_tensors, tok_meta = tokenizer.state()
        save_file(
            {k: v.contiguous() for k, v in tok_tensors.items()}, str(tmp / "tokenizer.safetensors")
        )
        config = {
            "format": FORMAT,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model.cfg.to_dict(),
            "tokenizer": tok_meta,
            "params": model.num_params(),
            **(meta or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


@contextmanager
def _staged_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden sibling directory to write into; on success its files are fsynced and it
    is renamed to ``path`` (which must not exist), on failure it is removed."""
    final = Path(path)
    if final.exists():
        raise FileExistsError(f"{final} exists; checkpoints are written once")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # durable before visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_tensors(root: Path, *names: str) -> list[dict[str, torch.Tensor]]:
    """The checkpoint's safetensors files ``names``; CheckpointError when one is missing,
    corrupt, or holds a non-finite float."""
    out = []
    for name in names:
        try:
            tensors = load_file(str(root / name))
        except (FileNotFoundError, OSError) as exc:
            raise CheckpointError(f"{root}: unreadable weights: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error type on corrupt files
            raise CheckpointError(f"{root}: corrupt safetensors file: {exc}") from exc
        bad = [
            k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise CheckpointError(f"{root}: non-finite weights in {', '.join(sorted(bad)[:5])}")
        out.append(tensors)
    return out


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    root = Path(path)
    config = _read_config(root, FORMAT)
    weights, tok_tensors = _read_tensors(root, "model.safetensors", "tokenizer.safetensors")
    try:
        model = OneRec(OneRecConfig(**config["model"]))
        model.load_state_dict(weights, strict=True)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{root}: weights do not match the config: {exc}") from exc
    tokenizer = SemanticIdTokenizer.from_state(tok_tensors, config["tokenizer"])
    return Checkpoint(model.eval(), tokenizer, config, root)


# --------------------------------------------------------------------------- baselines
BASELINE_FORMAT = "recloop.baseline/1"
BASELINE_KINDS = ("popularity", "random")


@dataclass
class BaselineCheckpoint:
    """A non-learned arm for A/B tests: ``popularity`` ranks by ``scores``, ``random``
    draws a fresh uniform slate per request. Same directory layout as a OneRec checkpoint
    minus the tokenizer: ``model.safetensors`` (``scores``, one per item) + ``config.json``."""

    kind: str
    scores: torch.Tensor  # (N,) float32, aligned with item_ids
    item_ids: list[int]
    session_len: int
    meta: dict
    path: Path


def save_baseline(
    path: str | os.PathLike[str],
    kind: str,
    item_ids: list[int],
    scores: torch.Tensor,
    session_len: int = 5,
    meta: dict | None = None,
) -> Path:
    """Write a baseline checkpoint directory atomically (it must not exist yet)."""
    if kind not in BASELINE_KINDS:
        raise CheckpointError(f"baseline kind must be one of {BASELINE_KINDS}, got {kind!r}")
    if len(item_ids) != len(scores) or not item_ids:
        raise CheckpointError(f"{len(item_ids)} item ids for {len(scores)} scores")
    with _staged_dir(path) as tmp:
        save_file({"scores": scores.detach().float().contiguous()}, str(tmp / "model.safetensors"))
        config = {
            "format": BASELINE_FORMAT,
            "kind": kind,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "session_len": int(session_len),
            "item_ids": [int(i) for i in item_ids],
            **(meta or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


def _read_config(root: Path, expected_format: str | None = None) -> dict:
    """The checkpoint's config.json; CheckpointError when missing, not JSON, or (with
    ``expected_format``) of another format."""
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{root}: no config.json (not a checkpoint?)") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{root}/config.json is not valid JSON: {exc}") from exc
    if expected_format is not None and config.get("format") != expected_format:
        raise CheckpointError(
            f"{root}: format {config.get('format')!r}, expected {expected_format!r}"
        )
    return config


def load_baseline(path: str | os.PathLike[str]) -> BaselineCheckpoint:
    root = Path(path)
    config = _read_config(root, BASELINE_FORMAT)
    if config.get("kind") not in BASELINE_KINDS:
        raise CheckpointError(f"{root}: unknown baseline kind {config.get('kind')!r}")
    try:
        scores = load_file(str(root / "model.safetensors"))["scores"]
    except KeyError as exc:
        raise CheckpointError(f"{root}: model.safetensors has no 'scores' tensor") from exc
    except Exception as exc:
        raise CheckpointError(f"{root}: unreadable weights: {exc}") from exc
    if not torch.isfinite(scores).all():
        raise CheckpointError(f"{root}: non-finite scores")
    item_ids = config.get("item_ids")
    if not isinstance(item_ids, list) or len(item_ids) != scores.numel():
        raise CheckpointError(f"{root}: item_ids do not match the {scores.numel()} scores")
    session_len = config.get("session_len", 5)
    if not isinstance(session_len, int) or session_len < 1:
        raise CheckpointError(f"{root}: session_len must be a positive integer")
    return BaselineCheckpoint(
        config["kind"], scores, [int(i) for i in item_ids], session_len, config, root
    )


# --------------------------------------------------------------------------- reward models
REWARD_FORMAT = "recloop.reward/1"


@dataclass
class RewardCheckpoint:
    """A session reward model (``models/reward``): ``model.safetensors`` + ``config.json``
    (``reward``: its config, ``item_ids``: the data id of model item m + 1)."""

    model: SessionRewardModel
    item_ids: list[int]
    meta: dict
    path: Path


def save_reward(
    path: str | os.PathLike[str],
    model: SessionRewardModel,
    item_ids: list[int],
    meta: dict | None = None,
) -> Path:
    """Write a reward checkpoint directory atomically (it must not exist yet)."""
    if len(item_ids) != model.cfg.num_items:
        raise CheckpointError(f"{len(item_ids)} item ids for {model.cfg.num_items} model items")
    with _staged_dir(path) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        config = {
            **(meta or {}),
            "format": REWARD_FORMAT,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reward": model.cfg.to_dict(),
            "item_ids": [int(i) for i in item_ids],
            "params": model.num_params(),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


def load_reward(path: str | os.PathLike[str]) -> RewardCheckpoint:
    root = Path(path)
    config = _read_config(root, REWARD_FORMAT)
    (weights,) = _read_tensors(root, "model.safetensors")
    try:
        model = SessionRewardModel(RewardConfig(**config["reward"]))
        model.load_state_dict(weights, strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{root}: weights do not match the config: {exc}") from exc
    item_ids = config.get("item_ids")
    ok = isinstance(item_ids, list) and all(isinstance(i, int) for i in item_ids)
    if not ok or len(item_ids) != model.cfg.num_items:
        raise CheckpointError(f"{root}: item_ids do not match the {model.cfg.num_items} items")
    return RewardCheckpoint(model.eval(), [int(i) for i in item_ids], config, root)


def checkpoint_format(path: str | os.PathLike[str]) -> str:
    """The ``format`` a checkpoint directory declares (CheckpointError if unreadable)."""
    return str(_read_config(Path(path)).get("format"))


# The files that make up a checkpoint of each format.
FILES = {
    FORMAT: ("model.safetensors", "tokenizer.safetensors", "config.json"),
    BASELINE_FORMAT: ("model.safetensors", "config.json"),
    REWARD_FORMAT: ("model.safetensors", "config.json"),
}


def validate_checkpoint(path: str | os.PathLike[str]) -> None:
    """Load the checkpoint whatever its format; CheckpointError for bad weights."""
    fmt = checkpoint_format(path)
    if fmt == BASELINE_FORMAT:
        load_baseline(path)
    elif fmt == REWARD_FORMAT:
        load_reward(path)
    else:
        ck = load_checkpoint(path)
        if ck.model.cfg.context_width:
            context_builder(ck)


def context_builder(ck: Checkpoint):
    """The ``recloop.context.ContextBuilder`` of a checkpoint whose model reads a
    context. One without its spec (fields, occupation vocabulary, item genres and
    popularity) is refused rather than served on contexts it was not trained on."""
    cfg = ck.model.cfg
    spec = ck.meta.get("context")
    if not spec:
        raise CheckpointError(
            f"{ck.path}: the model reads a context ({len(cfg.context_fields)} descriptor "
            f"fields, {cfg.anchors} anchors) but the checkpoint carries no context spec"
        )
    try:
        builder = ContextBuilder.from_spec(spec, cfg.context_fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ck.path}: bad context spec: {exc}") from exc
    if builder.anchors != cfg.anchors:
        raise CheckpointError(
            f"{ck.path}: {builder.anchors} anchors in the context spec, {cfg.anchors} in the model"
        )
    if builder.anchors and len(builder.popularity) != ck.tokenizer.num_items + 1:
        raise CheckpointError(f"{ck.path}: the context spec's item tables miss the catalogue")
    return builder
