"""Context engineering (OnePiece): each session's situational descriptors and preference
anchors, built the same way offline (from the dataset) and online (from a request).

A session is requested at a time (offline: the time of its first item, ``timestamps[p]``,
what a live request knows: now). Its context row is

- **descriptors**: hour of day (6 buckets of 4 h) and day of week of that time, in UTC,
  and, when the data has them (MovieLens ``u.user``, Feast ``user_profile`` online), the
  user's age group, gender and occupation. Index 0 is "unknown" in every field.
- **request tags** (optional, ``tag:<key>`` fields): the request's ``context[key]`` (entry
  point, device), hashed into 16 buckets; unknown offline, where the data has none.
- **anchors**: the ``anchors`` most popular items of the user's favourite genre over the
  last ``window`` items of the history (ties: the genre listed first), leaving out items
  in that window. Offline, popularity counts the training split only (validation and
  test items never); online it is that count plus the clicks Feast's ``item_stats`` has
  seen since. Needs genres (MovieLens ``u.item``).

The model reads the row as ``OneRecConfig.context_fields`` (the descriptor fields in the
order of ``fields``) then ``anchors`` item ids. ``ContextBuilder`` holds everything a row
needs; ``spec()`` is its JSON form, which a checkpoint carries so that serving builds the
very rows the model was trained on.

Ground floor (``recloop/``): serving builds rows with it, training writes its spec into
checkpoints. ``pipelines.offline.context.OfflineContext`` builds the offline rows of a dataset.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

TIME_FIELDS = {"hour": 7, "weekday": 8}  # cardinalities incl. 0 = unknown
USER_FIELDS = {"age": 8, "gender": 3, "occupation": 32}
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's groups: <18, 18-24, ..., 56+
TAG_PREFIX = "tag:"  # a field "tag:surface" reads the request's context["surface"]
TAG_BUCKETS = 16  # a tag's values hash into this many buckets (+ 0 = unknown)


def tag_bucket(value: str | None, buckets: int) -> int:
    """A request tag's value -> 1..buckets, the same in every process (0: absent)."""
    if value is None or value == "":
        return 0
    h = int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], "big")
    return 1 + h % buckets


SPEC_VERSION = 1


def _hour_bucket(ts: float) -> int:
    return time.gmtime(int(ts)).tm_hour // 4 + 1


def _weekday(ts: float) -> int:
    return time.gmtime(int(ts)).tm_wday + 1


class ContextBuilder:
    """Context rows from what a request knows: its time, the user's profile and history
    (model item ids, oldest first). ``genres`` (N + 1, G) multi-hot and ``popularity``
    (N + 1,) are by model item id; both are needed for anchors only."""

    def __init__(
        self,
        fields: Mapping[str, int],
        anchors: int = 0,
        window: int = 20,
        occupations: Sequence[str] = (),
        genres: torch.Tensor | None = None,
        popularity: torch.Tensor | None = None,
    ) -> None:
        tags = {f for f in fields if f.startswith(TAG_PREFIX) and len(f) > len(TAG_PREFIX)}
        unknown = set(fields) - set(TIME_FIELDS) - set(USER_FIELDS) - tags
        if unknown:
            raise ValueError(f"unknown context field(s): {', '.join(sorted(unknown))}")
        self.fields = dict(fields)
        self.anchors, self.window = int(anchors), int(window)
        self.occupations = list(occupations)
        self._occupation = {o: i + 1 for i, o in enumerate(self.occupations)}
        self.genres = genres
        self.by_genre: list[list[int]] = []
        self.popularity = popularity
        if self.anchors:
            if genres is None or popularity is None:
                raise ValueError("preference anchors need item genres and popularity")
            self.set_popularity(popularity)

    @property
    def width(self) -> int:
        return len(self.fields) + self.anchors

    def set_popularity(self, popularity: torch.Tensor) -> None:
        """Re-rank each genre's items by ``popularity`` (N + 1,); items never counted are
        nobody's popular item."""
        assert self.genres is not None
        pop = torch.as_tensor(popularity, dtype=torch.float64)
        if pop.shape != (self.genres.shape[0],):
            raise ValueError(f"popularity has shape {tuple(pop.shape)}, genres {self.genres.shape}")
        depth = self.anchors + self.window  # enough to skip a window's worth
        by_genre = []
        for g in self.genres.T:
            score = torch.where((g > 0) & (pop > 0), pop, torch.full_like(pop, -1.0))
            order = torch.argsort(score, descending=True, stable=True)[:depth]
            by_genre.append([int(i) for i in order if score[i] > 0])
        # Whole lists swapped in: a request reading them meanwhile sees old or new.
        self.popularity, self.by_genre = pop, by_genre

    def user_row(self, profile: Mapping[str, Any] | None) -> list[int]:
        """[age group, gender, occupation] of a profile (MovieLens ``u.user`` / Feast
        ``user_profile``: age in years, "M"/"F", occupation name); 0 where unknown."""
        profile = profile or {}
        age = profile.get("age")
        try:
            group = 1 + sum(int(age) >= e for e in AGE_EDGES) if age is not None else 0
        except (TypeError, ValueError):
            group = 0
        gender = {"M": 1, "F": 2}.get(str(profile.get("gender")), 0)
        occ = self._occupation.get(str(profile.get("occupation")), 0)
        return [group, gender, min(occ, USER_FIELDS["occupation"] - 1)]

    def row(
        self,
        history: Sequence[int],
        request_time: float | None,
        profile: Mapping[str, Any] | Sequence[int] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[int]:
        """The row of a session requested at ``request_time`` (Unix seconds, None:
        unknown) after ``history``; ``profile`` as ``user_row`` takes it, or that row;
        ``tags``: the request's context (entry point, device, ...). Descriptors come in
        the order of ``fields`` (the model's), then the anchors."""
        values: dict[str, int] = {}
        for name, size in self.fields.items():
            if name.startswith(TAG_PREFIX):
                values[name] = tag_bucket((tags or {}).get(name[len(TAG_PREFIX) :]), size - 1)
        if "hour" in self.fields:
            known = request_time is not None
            values["hour"] = _hour_bucket(request_time) if known else 0
            values["weekday"] = _weekday(request_time) if known else 0
        if "age" in self.fields:
            user = list(profile) if isinstance(profile, Sequence) else self.user_row(profile)
            values.update(zip(USER_FIELDS, user, strict=True))
        out = [values[name] for name in self.fields]
        if self.anchors:
            out += self._anchors(history)
        return out

    def _anchors(self, history: Sequence[int]) -> list[int]:
        assert self.genres is not None
        recent = [int(i) for i in list(history)[-self.window :] if 0 < int(i) < len(self.genres)]
        if not recent:
            return [0] * self.anchors
        votes = self.genres[torch.as_tensor(recent)].sum(dim=0)
        if float(votes.max()) <= 0:
            return [0] * self.anchors
        genre = int(votes.argmax())  # first of the tied: the genre listed first
        seen = set(recent)
        picked = [i for i in self.by_genre[genre] if i not in seen][: self.anchors]
        return picked + [0] * (self.anchors - len(picked))

    # ------------------------------------------------------------------ on disk
    def spec(self) -> dict[str, Any]:
        """JSON form (a checkpoint's ``context``): fields, anchors, window, the
        occupation vocabulary, and for anchors each item's genres and popularity."""
        out: dict[str, Any] = {
            "version": SPEC_VERSION,
            "fields": dict(self.fields),
            "anchors": self.anchors,
            "window": self.window,
            "occupations": list(self.occupations),
        }
        if self.anchors:
            assert self.genres is not None and self.popularity is not None
            out["genres"] = self.genres.shape[1]
            out["item_genres"] = [torch.nonzero(g).flatten().tolist() for g in self.genres]
            out["popularity"] = [float(p) for p in self.popularity]
        return out

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], model_fields: Mapping[str, int] | None = None
    ) -> ContextBuilder:
        """The builder ``spec`` describes. ``model_fields``: the ``context_fields`` of the
        model it feeds, whose order it then follows (JSON need not keep key order); they
        must name the same fields with the same sizes."""
        fields = dict(spec["fields"])
        if model_fields is not None:
            if dict(model_fields) != fields:
                raise ValueError(
                    f"the context spec's fields {fields} are not the model's {dict(model_fields)}"
                )
            fields = dict(model_fields)
        if spec.get("version") != SPEC_VERSION:
            raise ValueError(f"context spec version {spec.get('version')!r}, not {SPEC_VERSION}")
        genres = popularity = None
        if spec.get("anchors"):
            item_genres = spec["item_genres"]
            genres = torch.zeros(len(item_genres), int(spec["genres"]))
            for i, gs in enumerate(item_genres):
                genres[i, gs] = 1.0
            popularity = torch.tensor(spec["popularity"], dtype=torch.float64)
        return cls(
            fields,
            anchors=int(spec.get("anchors", 0)),
            window=int(spec.get("window", 20)),
            occupations=spec.get("occupations", ()),
            genres=genres,
            popularity=popularity,
        )


def live_popularity(
    base: torch.Tensor, to_model: Mapping[int, int], clicks: Mapping[int, int]
) -> tuple[torch.Tensor, int]:
    """Anchor popularity online: ``base`` (N + 1,) (the checkpoint's training counts,
    by model item id) plus ``clicks`` (data item id -> clicks so far, Feast
    ``item_stats``); and how many catalogue items had clicks."""
    pop = torch.as_tensor(base, dtype=torch.float64).clone()
    known = [(to_model[i], c) for i, c in clicks.items() if i in to_model and c > 0]
    for m, c in known:
        pop[m] += c
    return pop, len(known)
