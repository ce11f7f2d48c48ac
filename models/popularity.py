"""Most-popular baseline: every user gets the items ranked by training frequency."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MostPopular:
    """Scores an item by how often it occurs in the training sequences (ids 1..N)."""

    def __init__(self, num_items: int):
        self.num_items = num_items
        self.counts = torch.zeros(num_items + 1)  # (N+1,) column = item id

    def fit(self, sequences: Iterable[list[int]]) -> MostPopular:
        counts = torch.zeros(self.num_items + 1)
        for seq in sequences:
            if seq:
                counts += torch.bincount(
                    torch.as_tensor(seq, dtype=torch.long), minlength=self.num_items + 1
                )
        self.counts = counts
        return self

    def score(
        self, histories: list[list[int]], candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N+1) with column 0 = -inf, or (B, C) for ``candidates`` (B, C)."""
        full = self.counts.clone()
        full[0] = float("-inf")  # padding is never recommended
        full = full.unsqueeze(0).expand(len(histories), -1)  # (B, N+1)
        if candidates is None:
            return full.clone()
        return full.gather(1, candidates.long())  # (B, C)
