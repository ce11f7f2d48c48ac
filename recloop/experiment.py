"""A/B experiment config: which arms exist, their traffic shares, and who sees which arm.

An experiment is a list of arms, each backed by a registry lineage (see ``recloop.registry``)
and taking a share of users. Assignment hashes ``"<salt>:<user_id>"`` with SHA-256, so it is
stable across processes, machines and restarts (no Python ``hash()`` randomisation), and a new
salt reshuffles users for a fresh experiment. The config lives in YAML
(``infra/serve/experiment.yaml``) under a top-level ``experiment:`` key.

Cluster randomisation (``unit: cluster``): users are assigned by their cluster instead,
hashing ``"<salt>:cluster:<label>"``, so every user of a cluster sees one arm and alike
users do not straddle the arms (no arm's model learns from users much like another arm's).
``clusters`` maps user ids to labels; in YAML it is the path of a JSON object (relative
to the experiment file), e.g. written by ``recloop clusters``. A user the map does not
name is a cluster of their own. The analysis then takes clusters as its units.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # the registry's name rule (recloop.registry)
SHARE_TOLERANCE = 1e-6
DEFAULT_EXPERIMENT_PATH = (
    Path(__file__).resolve().parents[1] / "infra" / "serve" / "experiment.yaml"
)


class ArmSpec(BaseModel):
    """One arm: a name, its share of users, the registry lineage it serves, and replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    share: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    lineage: str = Field(default="", pattern=NAME_PATTERN)
    replicas: int = Field(default=1, ge=1)
    description: str = ""
    model: Literal["seed", "popularity", "random"] = Field(
        default="seed",
        description="what an arm without a version starts from: the seed checkpoint, or a "
        "non-learned baseline (a sanity arm the model must beat)",
    )
    scoring: Literal["beam", "cascade", "hybrid"] = Field(
        default="beam",
        description="beam: the best beam is the session; cascade (OnePiece): every beam's "
        "items re-ranked by the blend of their beam score and the model's contrastive head "
        "(the checkpoint must have one: trained with infonce_weight > 0); hybrid: the same "
        "with the encoder's next-item head (trained with next_item_weight > 0, as the seed)",
    )
    cascade_weight: float = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="the head's weight in the blend of a cascade or hybrid arm",
    )
    learning: Literal["frozen", "online", "online-ipa"] = Field(
        default="frozen",
        description="frozen: never retrained; online: continuous next-token training (a "
        "popularity arm: its counts follow the clicks); online-ipa: plus DPO on preference "
        "pairs from the mirrored 1%",
    )

    @model_validator(mode="before")
    @classmethod
    def _lineage_defaults_to_name(cls, data: Any) -> Any:
        """An arm usually serves the lineage of the same name; spell it out only if not."""
        if isinstance(data, dict) and data.get("lineage") in (None, "") and "name" in data:
            data = {**data, "lineage": data["name"]}
        return data

    @model_validator(mode="after")
    def _cascade_needs_a_model(self) -> ArmSpec:
        if self.scoring != "beam" and self.model != "seed":
            raise ValueError(
                f"arm {self.name!r}: scoring {self.scoring!r} re-ranks a OneRec model's beams; "
                f"a {self.model!r} arm has none"
            )
        return self

    @model_validator(mode="after")
    def _what_learns(self) -> ArmSpec:
        if self.learning == "frozen" or self.model == "seed":
            return self
        if self.model == "popularity" and self.learning == "online":
            return self  # its counts follow the clicks (pipelines/continuous/recount.py)
        raise ValueError(
            f"arm {self.name!r}: a {self.model!r} arm cannot learn {self.learning!r} "
            "(a popularity arm can be online: its counts follow the clicks)"
        )

    def scoring_options(self) -> dict[str, Any]:
        return {"scoring": self.scoring, "cascade_weight": self.cascade_weight}


class Experiment(BaseModel):
    """An A/B experiment: named arms whose shares sum to 1, and the salt of the assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    salt: str = Field(min_length=1)
    arms: list[ArmSpec] = Field(min_length=1)
    data_policy: Literal["own-arm", "pooled", "weighted"] = Field(
        default="own-arm",
        description="own-arm: a learning arm trains only on its own arm's traffic, so the "
        "comparison is fair; pooled: every learning arm trains on all traffic; weighted: "
        "pooled, each arm's sessions weighted by the inverse of its share of the traffic "
        "(docs/ab-designs.md)",
    )
    unit: Literal["user", "cluster"] = Field(
        default="user",
        description="what the assignment randomises: each user, or each cluster of users "
        "(``clusters``), so alike users land on one side (docs/ab-designs.md)",
    )
    clusters: dict[str, str] = Field(
        default_factory=dict,
        description="user id -> cluster label (unit: cluster); in YAML, the path of a JSON "
        "object, relative to the experiment file",
    )

    @model_validator(mode="after")
    def _clusters_go_with_the_cluster_unit(self) -> Experiment:
        if self.unit == "cluster" and not self.clusters:
            raise ValueError(
                "unit: cluster needs 'clusters' (the path of a JSON object mapping user ids "
                "to cluster labels; `recloop clusters --out FILE` writes one)"
            )
        if self.unit == "user" and self.clusters:
            raise ValueError("'clusters' is only read with unit: cluster (set it, or drop them)")
        return self

    def cluster_of(self, user_id: int | str) -> str:
        """The randomisation unit of ``user_id``: ``user:<id>`` when users are the unit or
        the map does not name the user, otherwise ``cluster:<label>``."""
        uid = str(int(user_id)) if not isinstance(user_id, str) else user_id
        label = self.clusters.get(uid) if self.unit == "cluster" else None
        return f"cluster:{label}" if label is not None else f"user:{uid}"

    def policy_statement(self) -> str:
        """The data policy (and the randomisation unit) in words, stated beside every
        result."""
        said = self._data_policy_statement()
        if self.unit == "cluster":
            n = len(set(self.clusters.values()))
            said += f"; users randomised by cluster ({n} clusters, the analysis' units)"
        return said

    def _data_policy_statement(self) -> str:
        learning = [a.name for a in self.arms if a.learning != "frozen"]
        if not learning:
            return "no learning arms: every arm serves a fixed model"
        if self.data_policy == "own-arm":
            return (
                f"own-arm: each learning arm ({', '.join(learning)}) trains only on its own "
                "arm's traffic"
            )
        if self.data_policy == "weighted":
            return (
                f"weighted: the learning arms ({', '.join(learning)}) train on all arms' "
                "traffic, each arm's weighted by the inverse of its share"
            )
        return f"pooled: the learning arms ({', '.join(learning)}) train on all arms' traffic"

    @field_validator("arms")
    @classmethod
    def _arms_are_unique_and_shares_sum_to_one(cls, arms: list[ArmSpec]) -> list[ArmSpec]:
        names = [a.name for a in arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique; duplicated: {', '.join(dupes)}")
        total = math.fsum(a.share for a in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(
                f"arm shares must sum to 1, they sum to {total:.6g} "
                f"({', '.join(f'{a.name}={a.share:g}' for a in arms)}); adjust the shares"
            )
        return arms

    def assign(self, user_id: int | str) -> str:
        """The arm name for ``user_id``; the same for the same user and salt, everywhere.

        ``u`` = first 8 bytes of sha256("<salt>:<user_id>") as a big-endian integer / 2**64,
        uniform in [0, 1); the arm is the first whose cumulative share exceeds ``u``, and the
        last arm catches any floating-point shortfall. ``7``, ``numpy.int64(7)`` and ``"7"``
        get the same arm.
        """
        if isinstance(user_id, bool) or not isinstance(user_id, numbers.Integral | str):
            raise TypeError(f"user_id must be an int or str, got {type(user_id).__name__}")
        if not isinstance(user_id, str):
            user_id = int(user_id)  # numpy integers hash like the plain int
        key: int | str = user_id
        if self.unit == "cluster" and (label := self.clusters.get(str(user_id))) is not None:
            key = f"cluster:{label}"  # every user of the cluster draws the same u
        digest = hashlib.sha256(f"{self.salt}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        cum = 0.0
        for arm in self.arms[:-1]:
            cum += arm.share
            if u < cum:
                return arm.name
        return self.arms[-1].name

    def arm(self, name: str) -> ArmSpec:
        """The arm called ``name``; ValueError listing the known arms otherwise."""
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(
            f"experiment {self.name!r} has no arm {name!r}; known arms: "
            f"{', '.join(a.name for a in self.arms)}"
        )

    def shares(self) -> dict[str, float]:
        """Arm name -> share of users."""
        return {a.name: a.share for a in self.arms}


def load_experiment(path: str | os.PathLike[str] = DEFAULT_EXPERIMENT_PATH) -> Experiment:
    """Read an experiment from YAML with a top-level ``experiment:`` mapping.

    Bad YAML, a missing ``experiment:`` key and validation failures all raise ValueError
    naming the file (validation errors include pydantic's message).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"experiment file {p} not found; pass the path of an experiment YAML "
            f"(the default is {DEFAULT_EXPERIMENT_PATH})"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("experiment"), dict):
        raise ValueError(
            f"{p}: expected a top-level 'experiment:' mapping (name, salt, arms), "
            f"got {type(doc.get('experiment') if isinstance(doc, dict) else doc).__name__}"
        )
    spec = dict(doc["experiment"])
    if isinstance(spec.get("clusters"), str):
        spec["clusters"] = read_clusters(p.parent / spec["clusters"], p)
    try:
        return Experiment.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(f"{p}: invalid experiment: {exc}") from exc


def read_clusters(path: Path, named_by: Path) -> dict[str, str]:
    """A clusters file: a JSON object of user id -> cluster label (strings or numbers)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{named_by}: clusters file {path} not found (write one with `recloop clusters "
            f"--out {path}`)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in raw.values()
    ):
        raise ValueError(f"{path}: expected a JSON object of user id -> cluster label")
    return {str(k): str(v) for k, v in raw.items()}


def genre_clusters(
    histories: dict[int, list[int]], item_genres: dict[int, list[str]]
) -> dict[int, str]:
    """Each user's cluster: the genre their history holds most (ties: the first in name
    order; no known genre: ``"-"``)."""
    out = {}
    for u, items in histories.items():
        counts: dict[str, int] = {}
        for i in items:
            for g in item_genres.get(int(i), []):
                counts[g] = counts.get(g, 0) + 1
        best = max(counts.values(), default=0)
        out[u] = min((g for g, c in counts.items() if c == best), default="-")
    return out
