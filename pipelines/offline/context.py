"""Context rows offline: ``OfflineContext`` builds the context row (OnePiece's situational
descriptors and preference anchors) of every session of a leave-one-out split.

The row itself is ``recloop.context.ContextBuilder``'s, the very one serving builds per
request (see there for the fields).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.offline.datasets import SequenceDataset
from pipelines.offline.evaluation import Split
from recloop.context import TAG_BUCKETS, TAG_PREFIX, TIME_FIELDS, USER_FIELDS, ContextBuilder


class OfflineContext:
    """Context rows for the sessions of a leave-one-out split of ``ds``. ``source``: the
    MovieLens folder ``ds`` came from, or its ``InteractionData`` (users, item genres)."""

    def __init__(
        self,
        ds: SequenceDataset,
        split: Split,
        source: Any = None,
        descriptors: bool = True,
        anchors: int = 0,
        window: int = 20,
        tags: Sequence[str] = (),
    ) -> None:
        if ds.timestamps is None and descriptors:
            raise ValueError(f"{ds.name}: descriptors need timestamps")
        self.ds, self.split = ds, split
        data = source
        if isinstance(source, (str, Path)):
            data = None
            if (Path(source) / "u.user").exists():
                from recloop.data import load_movielens

                data = load_movielens(source)
        fields: dict[str, int] = dict(TIME_FIELDS) if descriptors else {}
        occupations: list[str] = []
        if descriptors and data is not None:
            fields.update(USER_FIELDS)
            occupations = sorted({str(o) for o in data.users["occupation"]})
        # Request tags (entry point, device) are unknown offline; served and continuously
        # trained, the model reads them from the request's context.
        fields.update({f"{TAG_PREFIX}{t}": TAG_BUCKETS + 1 for t in tags})
        genres = popularity = None
        if anchors:
            if data is None:
                raise ValueError(f"{ds.name}: preference anchors need genres (MovieLens u.item)")
            from pipelines.offline.pretrain import genre_features

            genres = genre_features(ds, Path(), data)
            counts = Counter(i for seq in split.train for i in seq)
            popularity = torch.zeros(ds.num_items + 1, dtype=torch.float64)
            for item, c in counts.items():
                popularity[item] = c
        self.builder = ContextBuilder(fields, anchors, window, occupations, genres, popularity)
        self.user_rows: dict[int, list[int]] = {}
        if "age" in fields:
            for row in data.users.itertuples():
                u = ds.user_id_map.get(int(row.user_id))
                if u is not None:
                    self.user_rows[u] = self.builder.user_row(row._asdict())

    @property
    def fields(self) -> dict[str, int]:
        return self.builder.fields

    @property
    def anchors(self) -> int:
        return self.builder.anchors

    @property
    def width(self) -> int:
        return self.builder.width

    def model_options(self) -> dict:
        return {"context_fields": dict(self.fields), "anchors": self.anchors}

    def row(self, user: int, history: Sequence[int], request_time: int | None) -> list[int]:
        return self.builder.row(history, request_time, self.user_rows.get(user, [0, 0, 0]))

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
