"""Context engineering offline (OnePiece): each session's situational descriptors and
preference anchors, from the dataset itself.

A session at position p of a user's sequence is requested at the time of its first item,
``timestamps[p]`` (what a live request knows: now). Its context row is

- **descriptors**: hour of day (6 buckets of 4 h) and day of week of that time, in UTC,
  and, when the data has them (MovieLens ``u.user``), the user's age group, gender and
  occupation. Index 0 is "unknown" in every field.
- **anchors**: the ``anchors`` most popular training items of the user's favourite genre
  over the last ``window`` items before p (ties: the genre listed first), leaving out
  items in that history. Popularity counts the training split only (validation and test
  items never). Needs genres (MovieLens ``u.item``).

The model reads the row as ``OneRecConfig.context_fields`` (the descriptor fields in the
order of ``fields``) then ``anchors`` item ids.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from pipelines.datasets import SequenceDataset
from pipelines.evaluation import Split

TIME_FIELDS = {"hour": 7, "weekday": 8}  # cardinalities incl. 0 = unknown
USER_FIELDS = {"age": 8, "gender": 3, "occupation": 32}
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's groups: <18, 18-24, ..., 56+


def _hour_bucket(ts: int) -> int:
    return time.gmtime(int(ts)).tm_hour // 4 + 1


def _weekday(ts: int) -> int:
    return time.gmtime(int(ts)).tm_wday + 1


class OfflineContext:
    """Context rows for the sessions of a leave-one-out split of ``ds``."""

    def __init__(
        self,
        ds: SequenceDataset,
        split: Split,
        movielens_dir: str | Path | None = None,
        descriptors: bool = True,
        anchors: int = 0,
        window: int = 20,
    ) -> None:
        if ds.timestamps is None and descriptors:
            raise ValueError(f"{ds.name}: descriptors need timestamps")
        self.ds, self.split = ds, split
        self.anchors, self.window = anchors, window
        self.fields: dict[str, int] = dict(TIME_FIELDS) if descriptors else {}
        self.user_rows: dict[int, list[int]] = {}
        self.genres: torch.Tensor | None = None  # (N + 1, G) multi-hot
        data = None
        if movielens_dir is not None and (Path(movielens_dir) / "u.user").exists():
            from pipelines.data import load_movielens

            data = load_movielens(movielens_dir)
        if descriptors and data is not None:
            self.fields.update(USER_FIELDS)
            occupations = {o: i + 1 for i, o in enumerate(sorted(set(data.users["occupation"])))}
            to_contiguous = ds.user_id_map
            for row in data.users.itertuples():
                u = to_contiguous.get(int(row.user_id))
                if u is None:
                    continue
                age = 1 + sum(int(row.age) >= e for e in AGE_EDGES)
                gender = {"M": 1, "F": 2}.get(str(row.gender), 0)
                occ = min(occupations.get(row.occupation, 0), USER_FIELDS["occupation"] - 1)
                self.user_rows[u] = [age, gender, occ]
        if anchors:
            if data is None:
                raise ValueError(f"{ds.name}: preference anchors need genres (MovieLens u.item)")
            from pipelines.pretrain import genre_features

            self.genres = genre_features(ds, Path(movielens_dir), data)
            counts = Counter(i for seq in split.train for i in seq)
            pop = torch.zeros(ds.num_items + 1)
            for item, c in counts.items():
                pop[item] = c
            # Per genre, items by training popularity (enough to skip a window's worth);
            # items never seen in training are nobody's popular item.
            depth = anchors + window
            self.by_genre = []
            for g in self.genres.T:
                score = torch.where((g > 0) & (pop > 0), pop, torch.full_like(pop, -1.0))
                order = torch.argsort(score, descending=True, stable=True)[:depth]
                self.by_genre.append([int(i) for i in order if score[i] > 0])

    @property
    def width(self) -> int:
        return len(self.fields) + self.anchors

    def model_options(self) -> dict:
        return {"context_fields": dict(self.fields), "anchors": self.anchors}

    def row(self, user: int, history: Sequence[int], request_time: int | None) -> list[int]:
        out: list[int] = []
        if "hour" in self.fields:
            known = request_time is not None
            out += [_hour_bucket(request_time), _weekday(request_time)] if known else [0, 0]
        if "age" in self.fields:
            out += self.user_rows.get(user, [0, 0, 0])
        if self.anchors:
            out += self._anchors(history)
        return out

    def _anchors(self, history: Sequence[int]) -> list[int]:
        assert self.genres is not None
        recent = list(history)[-self.window :]
        if not recent:
            return [0] * self.anchors
        votes = self.genres[torch.as_tensor(recent)].sum(dim=0)
        if float(votes.max()) <= 0:
            return [0] * self.anchors
        genre = int(votes.argmax())  # first of the tied: the genre listed first
        seen = set(recent)
        picked = [i for i in self.by_genre[genre] if i not in seen][: self.anchors]
        return picked + [0] * (self.anchors - len(picked))

    # ------------------------------------------------------------------ per split part
    def _time(self, user: int, position: int) -> int | None:
        if self.ds.timestamps is None:
            return None
        return self.ds.timestamps[user][position]

    def train_row(self, index: int, position: int) -> list[int]:
        """The session at ``position`` of training sequence ``index`` (``make_examples``)."""
        user = self.split.users[index]
        seq = self.split.train[index]
        return self.row(user, seq[:position], self._time(user, position))

    def rows(self, part: str) -> list[list[int]]:
        """One row per user for ``part`` = "val" or "test"."""
        out = []
        for i, user in enumerate(self.split.users):
            hist = self.split.val_histories[i] if part == "val" else self.split.test_histories[i]
            out.append(self.row(user, hist, self._time(user, len(hist))))
        return out
