"""``recloop clusters``: the clusters a cluster-randomised experiment assigns.

Users whose tastes are alike, split between arms that learn, leak each other's effect
through the data (docs/ab-designs.md). An experiment with ``unit: cluster`` assigns
whole clusters instead, so alike users land on one side; this writes the map it reads,
a JSON object of user id -> cluster label. The clustering is the one ``make bench-bias``
measures: the genre a user's history holds most (ties: the first genre by name; a user
with no known genre: ``-``). Computed from data the platform holds before the run.

    recloop clusters --out .recloop/experiments/clusters.json
    # then, in the run file:  experiment: {unit: cluster, clusters: <that path>, ...}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def clusters_of(data: object) -> dict[int, str]:
    """Each user of ``data`` (``recloop.data.InteractionData``) and their cluster."""
    from recloop.experiment import genre_clusters

    ratings = data.ratings.sort_values(["user_id", "timestamp"], kind="mergesort")
    hist = {int(u): [int(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
    genres = {
        int(i): list(g) for i, g in zip(data.items["item_id"], data.items["genres"], strict=True)
    }
    return genre_clusters(hist, genres)


def main(argv: list[str] | None = None) -> int:
    from recloop.config import load_config
    from recloop.data import load

    ap = argparse.ArgumentParser(prog="recloop clusters", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON map to write")
    ap.add_argument("--config", help="stack config (its data: MovieLens, or synthetic)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    data = load(cfg.data)
    clusters = clusters_of(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({str(u): c for u, c in sorted(clusters.items())}, indent=0))
    sizes = Counter(clusters.values())
    print(
        f"wrote {args.out}: {len(clusters)} users in {len(sizes)} clusters "
        f"(largest {max(sizes.values())}, smallest {min(sizes.values())} users) from "
        f"{data.summary()}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
