"""Semantic-ID tokenizer: balanced residual k-means (OneRec §3.1, Algorithm 1) over collaborative
item embeddings (OnePiece's collaborative residual k-means), with unique SIDs and a prefix trie
for constrained decoding.

An item's semantic ID (SID) is a tuple of `levels` codes, each in [0, codebook_size). Level 1
clusters the embeddings, level l clusters the residuals left by levels < l; codebooks are global
per level (not per parent), as in OneRec. Items whose SID collides with a closer item's are moved
to a free SID: by default the one sharing the longest prefix with their own SID (so they stay in
their semantic neighbourhood of the code tree), or else the nearest free SID overall. Pure torch,
no file I/O: `state()` / `from_state()` hand tensors and JSON-able metadata to whoever does the
saving (safetensors, never pickle).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

STATE_FORMAT = "recloop.semantic_id_tokenizer"
STATE_VERSION = 1
COLLISION_STRATEGIES = ("prefix", "nearest")


@dataclass
class TokenizerConfig:
    levels: int = 3  # codes per SID
    codebook_size: int = 32  # K, the same at every level
    kmeans_iters: int = 30  # max balanced k-means iterations per level
    seed: int = 0  # seeds the k-means init; the fit is deterministic under it
    # Where an item goes when its SID is taken by a closer item:
    #   "prefix":  the free SID sharing the longest prefix with its own SID (same first L-1
    #              codes if any is free, else the same first L-2, ...), lowest reconstruction
    #              error among those; keeps items in their neighbourhood of the code tree.
    #   "nearest": the free SID with the lowest reconstruction error, whatever its prefix.
    collision: str = "prefix"

    def __post_init__(self) -> None:
        if self.collision not in COLLISION_STRATEGIES:
            raise ValueError(
                f"TokenizerConfig.collision must be one of {COLLISION_STRATEGIES}, "
                f"got {self.collision!r}"
            )
        for name in ("levels", "codebook_size", "kmeans_iters", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"TokenizerConfig.{name} must be an int, got {v!r}")
        if self.levels < 1:
            raise ValueError(f"TokenizerConfig.levels must be >= 1, got {self.levels}")
        if self.codebook_size < 2:
            raise ValueError(
                f"TokenizerConfig.codebook_size must be >= 2, got {self.codebook_size}"
            )
        if self.kmeans_iters < 1:
            raise ValueError(f"TokenizerConfig.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.seed < 0:
            raise ValueError(f"TokenizerConfig.seed must be >= 0, got {self.seed}")
        # SIDs are packed into one int64 key (for vectorised lookups): keep K^levels < 2^62.
        if self.levels * math.log2(self.codebook_size) >= 62:
            raise ValueError(
                f"codebook_size**levels = {self.codebook_size}**{self.levels} is too large "
                "(must be < 2**62)"
            )

    @property
    def capacity(self) -> int:
        """How many distinct SIDs exist: K^levels."""
        return self.codebook_size**self.levels


def codebook_for(num_items: int, levels: int = 3, smallest: int = 16) -> int:
    """Codes per level for a catalogue of ``num_items``: the smallest power of two, from
    ``smallest`` on, whose ``levels``-deep tree has twice as many SIDs as items (a tree
    that is at most half full: MovieLens-100k's 1 682 items fill 41% of 16**3, the
    setting measured best there; 23 000 items get 64 codes, 262 144 SIDs)."""
    if num_items < 1 or levels < 1:
        raise ValueError(f"need num_items >= 1 and levels >= 1, got {num_items}, {levels}")
    k = smallest
    while k**levels < 2 * num_items:
        k *= 2
    return k


# -----------------------------------------------------------------------------
# Balanced k-means (OneRec Algorithm 1)


def _check_kmeans_args(x: Tensor, k: int, iters: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"balanced k-means expects x of shape (N, D), got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"balanced k-means needs k >= 1, got {k}")
    if x.shape[0] < k:
        raise ValueError(f"balanced k-means needs at least k={k} points, got N={x.shape[0]}")
    if iters < 1:
        raise ValueError(f"balanced k-means needs iters >= 1, got {iters}")


def _capacities(n: int, k: int) -> list[int]:
    # floor(N/K) each, and the first N mod K clusters take one more.
    base, extra = divmod(n, k)
    return [base + (1 if c < extra else 0) for c in range(k)]


def _init_indices(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    # k distinct points; shared by the fast and the reference version so that they start alike.
    return torch.randperm(n, generator=generator)[:k]


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances between rows: (M, D), (N, D) -> (M, N)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)  # the expansion can dip below 0 by rounding


def _cluster_means(x: Tensor, assign: Tensor, k: int) -> Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)  # (K, D)
    counts = torch.bincount(assign, minlength=k).clamp_min(1).to(x.dtype)  # (K,)
    return sums / counts[:, None]


def balanced_kmeans(
    x: Tensor, k: int, iters: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """OneRec Algorithm 1: k-means where cluster c holds exactly its capacity of points.

    x: (N, D). Returns centroids (k, D) in x's dtype and assign (N,) long. Each iteration the
    centroids, in index order, take their nearest still-unallocated points (Euclidean, ties to
    the lower index) up to capacity; then every centroid becomes the mean of its points. Stops
    when the assignment no longer changes, or after `iters` iterations.
    """
    _check_kmeans_args(x, k, iters)
    n = x.shape[0]
    caps = _capacities(n, k)
    centroids = x[_init_indices(n, k, generator)].clone()  # (K, D)
    assign: Tensor | None = None
    for _ in range(iters):
        # Every centroid ranks every point once; the greedy pass below only skips taken points,
        # so one (K, N) sort replaces K sorts over shrinking candidate sets.
        order = torch.argsort(_sq_dists(centroids, x), dim=1, stable=True)  # (K, N)
        taken = torch.zeros(n, dtype=torch.bool)
        new = torch.empty(n, dtype=torch.long)
        for c in range(k):
            cand = order[c]
            pick = cand[~taken[cand]][: caps[c]]
            taken[pick] = True
            new[pick] = c
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = _cluster_means(x, assign, k)
    assert assign is not None
    return centroids, assign


def balanced_kmeans_reference(
    x: Tensor, k: int, iters: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Slow, obvious twin of `balanced_kmeans` (loops over points), kept to test the fast one."""
    _check_kmeans_args(x, k, iters)
    n = x.shape[0]
    caps = _capacities(n, k)
    centroids = x[_init_indices(n, k, generator)].clone()
    assign: list[int] | None = None
    for _ in range(iters):
        new = [-1] * n
        unallocated = list(range(n))
        for c in range(k):
            ranked = sorted((float(((x[i] - centroids[c]) ** 2).sum()), i) for i in unallocated)
            chosen = {i for _, i in ranked[: caps[c]]}
            for i in chosen:
                new[i] = c
            unallocated = [i for i in unallocated if i not in chosen]
        if new == assign:
            break
        assign = new
        centroids = torch.stack(
            [x[[i for i in range(n) if assign[i] == c]].mean(0) for c in range(k)]
        )
    assert assign is not None
    return centroids, torch.tensor(assign, dtype=torch.long)


def residual_balanced_kmeans(x: Tensor, config: TokenizerConfig) -> tuple[Tensor, Tensor]:
    """Balanced k-means on the embeddings, then on each level's residuals.

    x: (N, D). Returns codebooks (levels, K, D) in x's dtype and the balanced codes (N, levels);
    these are the greedy codes, before any uniqueness fix.
    """
    g = torch.Generator().manual_seed(config.seed)
    residual = x  # (N, D)
    books, codes = [], []
    for _ in range(config.levels):
        c, a = balanced_kmeans(residual, config.codebook_size, config.kmeans_iters, g)
        books.append(c)
        codes.append(a)
        residual = residual - c[a]
    return torch.stack(books), torch.stack(codes, dim=1)


# -----------------------------------------------------------------------------
# Quantisation with frozen codebooks


def _greedy_encode(x: Tensor, books: Tensor) -> Tensor:
    """Nearest code per level on the running residual: (n, D), (L, K, D) -> (n, L)."""
    residual = x
    codes = []
    for level in range(books.shape[0]):
        c = _sq_dists(residual, books[level]).argmin(1)  # (n,)
        codes.append(c)
        residual = residual - books[level][c]
    return torch.stack(codes, dim=1)


def _reconstruct(codes: Tensor, books: Tensor) -> Tensor:
    """Sum of the chosen centroids: (n, L), (L, K, D) -> (n, D)."""
    levels = torch.arange(books.shape[0])
    return books[levels[None, :], codes].sum(1)


def _beam_candidates(x: Tensor, books: Tensor, beam: int) -> tuple[Tensor, Tensor]:
    """Complete SIDs for each row of x, best first by ||x - sum_l C_l[c_l]||^2.

    x: (n, D), books: (L, K, D). Keeps the `beam` best prefixes at each level but all beam*K
    completions at the last one. Returns codes (n, M, L) and errors (n, M). When
    beam >= K^(L-1) nothing is pruned, so this enumerates every SID in order.
    """
    n = x.shape[0]
    levels, k, _ = books.shape
    prefix = torch.empty(n, 1, 0, dtype=torch.long)  # (n, b, l)
    residual = x[:, None, :]  # (n, b, D)
    err = torch.empty(0)
    for level in range(levels):
        cb = books[level]  # (K, D)
        # ||r - c||^2 for every (prefix, code) pair without materialising (n, b, K, D).
        e = (residual * residual).sum(-1, keepdim=True) - 2.0 * residual @ cb.T
        e = (e + (cb * cb).sum(1)).clamp_min(0.0)  # (n, b, K)
        flat = e.flatten(1)  # (n, b*K)
        keep = flat.shape[1] if level == levels - 1 else min(beam, flat.shape[1])
        order = torch.argsort(flat, dim=1, stable=True)[:, :keep]  # (n, keep)
        parent, code = order // k, order % k
        prefix = torch.cat(
            [torch.gather(prefix, 1, parent[..., None].expand(-1, -1, level)), code[..., None]],
            dim=2,
        )
        residual = torch.gather(residual, 1, parent[..., None].expand(-1, -1, x.shape[1]))
        residual = residual - cb[code]
        err = torch.gather(flat, 1, order)
    return prefix, err


# -----------------------------------------------------------------------------
# Prefix trie for constrained decoding


class SidTrie:
    """The set of valid SIDs, answering "which codes may follow this prefix?".

    Per-prefix boolean masks are tensors built on first use and dropped when an insert adds
    a code below their prefix, so `next_mask` is one dict lookup per row plus a stack, and
    inserting the whole catalogue (loading a checkpoint) costs no tensor op per item.
    """

    def __init__(self, codebook_size: int, levels: int) -> None:
        if codebook_size < 1 or levels < 1:
            raise ValueError(
                f"SidTrie needs codebook_size >= 1 and levels >= 1, "
                f"got {codebook_size} and {levels}"
            )
        self.codebook_size = codebook_size
        self.levels = levels
        self._sids: set[tuple[int, ...]] = set()
        self._children: dict[tuple[int, ...], set[int]] = {}
        self._masks: dict[tuple[int, ...], Tensor] = {}  # prefix -> (K,) bool
        self._none = torch.zeros(codebook_size, dtype=torch.bool)  # unknown/complete prefixes

    def _check(self, sid: Sequence[int]) -> tuple[int, ...]:
        t = tuple(int(c) for c in sid)
        if len(t) != self.levels:
            raise ValueError(f"a SID has {self.levels} codes, got {len(t)}: {t}")
        if any(c < 0 or c >= self.codebook_size for c in t):
            raise ValueError(f"SID codes must lie in [0, {self.codebook_size}), got {t}")
        return t

    def insert(self, sid: Sequence[int]) -> None:
        """Add a SID (a no-op when it is already there)."""
        self._insert(self._check(sid))

    def _insert(self, t: tuple[int, ...]) -> None:
        """`insert` of a SID already checked (a tuple of `levels` codes in range)."""
        if t in self._sids:
            return
        self._sids.add(t)
        for depth in range(self.levels):
            prefix, code = t[:depth], t[depth]
            kids = self._children.get(prefix)
            if kids is None:
                kids = self._children[prefix] = set()
            if code not in kids:
                kids.add(code)
                self._masks.pop(prefix, None)  # rebuilt with the new code when next asked

    def _mask(self, prefix: tuple[int, ...]) -> Tensor:
        mask = self._masks.get(prefix)
        if mask is None:
            kids = list(self._children.get(prefix, ()))
            if not kids:
                return self._none
            mask = torch.zeros(self.codebook_size, dtype=torch.bool)
            mask[kids] = True
            self._masks[prefix] = mask
        return mask

    def __contains__(self, sid: object) -> bool:
        try:
            return tuple(sid) in self._sids  # type: ignore[arg-type]
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._sids)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(sorted(self._sids))

    def allowed(self, prefix: Sequence[int] = ()) -> list[int]:
        """Sorted valid next codes after `prefix`; `allowed(())` gives the valid first codes."""
        return sorted(self._children.get(tuple(prefix), ()))

    def next_mask(self, prefixes: Sequence[Sequence[int]]) -> Tensor:
        """(B, K) bool, True where the code may follow row b's prefix; lengths may differ."""
        if len(prefixes) == 0:
            return torch.zeros(0, self.codebook_size, dtype=torch.bool)
        return torch.stack([self._mask(tuple(p)) for p in prefixes])


# -----------------------------------------------------------------------------
# The tokenizer


class SemanticIdTokenizer:
    """Item id <-> unique semantic ID, built by balanced residual k-means.

    Build with `fit` (or `from_state`). Cold-start items join with `add_item`: frozen codebooks,
    a free SID chosen by `config.collision` if their greedy one is taken, and straight into the
    trie so they can be decoded at once.
    """

    _BEAM = 16  # first beam width when looking for a free SID; widened until one is found
    # "prefix" ranks a whole subtree of K^m SIDs exactly when it is at most this many SIDs (and
    # the K^(m-1) partial residuals at most _EXACT_ELEMS floats); larger ones use the beam.
    _EXACT_SIDS = 1 << 20
    _EXACT_ELEMS = 1 << 22

    def __init__(self, config: TokenizerConfig, codebooks: Tensor) -> None:
        # Use `fit` or `from_state`; this only sets up the empty maps.
        if codebooks.dim() != 3 or codebooks.shape[:2] != (config.levels, config.codebook_size):
            raise ValueError(
                f"codebooks must be (levels={config.levels}, K={config.codebook_size}, D), "
                f"got {tuple(codebooks.shape)}"
            )
        self.config = config
        self.codebooks = codebooks.to(torch.float32).contiguous()  # (L, K, D), frozen
        self._trie = SidTrie(config.codebook_size, config.levels)
        self._ids: list[int] = []
        self._sids: list[tuple[int, ...]] = []
        self._row: dict[int, int] = {}  # item id -> row
        self._item_of: dict[tuple[int, ...], int] = {}  # SID -> item id
        self._err: list[float] = []  # reconstruction error of each item's final SID
        self._moved: list[bool] = []  # whether the item left its greedy SID for uniqueness
        # The item's own SID before the uniqueness fix (k-means codes in `fit`, `encode` for
        # cold start); None when unknown (states written before it was kept).
        self._own: list[tuple[int, ...] | None] = []
        self._under: dict[tuple[int, ...], int] = {}  # proper prefix -> SIDs in use below it
        self._cache: dict[str, Tensor] = {}  # lazily built lookup tensors; cleared on change
        # Powers of K pack a SID into one int64 key: (L,)
        k, lv = config.codebook_size, config.levels
        self._radix = torch.tensor([k ** (lv - 1 - i) for i in range(lv)], dtype=torch.long)

    # --- building ------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, embeddings: Tensor, item_ids: Sequence[int], config: TokenizerConfig | None = None
    ) -> SemanticIdTokenizer:
        """Fit the codebooks on embeddings (N, D), row i being item_ids[i]; give every item a
        unique SID. Deterministic under config.seed."""
        config = config or TokenizerConfig()
        ids = _check_ids(item_ids)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(
                f"embeddings must be (N={len(ids)}, D) to match item_ids, "
                f"got {tuple(embeddings.shape)}"
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or inf")
        n = len(ids)
        if n > config.capacity:
            raise ValueError(
                f"{n} items cannot all get unique SIDs: only codebook_size**levels = "
                f"{config.capacity} exist; raise codebook_size or levels (codebook_for("
                f"{n}, {config.levels}) = {codebook_for(n, config.levels)} codes fits)"
            )
        if n < config.codebook_size:
            raise ValueError(f"need at least codebook_size={config.codebook_size} items, got {n}")

        # Cluster in float64: the greedy pass ranks distances, and near-ties should not hinge
        # on float32 rounding.
        x = embeddings.detach().to("cpu", torch.float64)  # (N, D)
        books, greedy = residual_balanced_kmeans(x, config)  # (L, K, D), (N, L)
        tok = cls(config, books)
        books = tok.codebooks.to(torch.float64)  # score against what is stored, as add_item does
        err = ((x - _reconstruct(greedy, books)) ** 2).sum(1)  # (N,)

        # Closest item keeps a contested SID: reserve every SID's first claimant (by error, then
        # row) before moving anyone, so a moved item never evicts a later claimant.
        order = torch.argsort(err, stable=True).tolist()
        greedy_t = [tuple(r) for r in greedy.tolist()]
        final: list[tuple[int, ...] | None] = [None] * n
        taken: set[tuple[int, ...]] = set()
        movers: list[int] = []
        for i in order:
            if greedy_t[i] in taken:
                movers.append(i)
            else:
                taken.add(greedy_t[i])
                final[i] = greedy_t[i]
        final_err = err.clone()
        if movers:
            if config.collision == "prefix":
                under = _prefix_counts(taken)
                found = tok._prefix_free_sids(x[movers], greedy[movers], books, taken, under)
            else:
                found = tok._free_sids(x[movers], books, taken)
            for i, sid, e in found:
                final[movers[i]] = sid
                final_err[movers[i]] = e
        moved = set(movers)
        for row, item_id in enumerate(ids):
            sid = final[row]
            assert sid is not None
            tok._append(item_id, sid, float(final_err[row]), row in moved, greedy_t[row])
        return tok

    def _free_sids(
        self, x: Tensor, books: Tensor, taken: set[tuple[int, ...]]
    ) -> Iterator[tuple[int, tuple[int, ...], float]]:
        """For each row of x (n, D), in order, the nearest SID not in `taken` (claimed as it
        goes). Yields (row, sid, error)."""
        k, levels = self.config.codebook_size, self.config.levels
        full = k ** (levels - 1)  # a beam this wide prunes nothing
        chunk = 256  # bounds the (chunk, beam*K) candidate tensors
        for start in range(0, x.shape[0], chunk):
            xs = x[start : start + chunk]
            codes, errs = _beam_candidates(xs, books, min(self._BEAM, full))
            for j in range(xs.shape[0]):
                beam = min(self._BEAM, full)
                cand, cerr = codes[j], errs[j]
                while True:
                    hit = next(
                        (m for m, c in enumerate(cand.tolist()) if tuple(c) not in taken), None
                    )
                    if hit is not None:
                        sid = tuple(cand[hit].tolist())
                        taken.add(sid)
                        yield start + j, sid, float(cerr[hit])
                        break
                    if beam >= full:
                        raise RuntimeError("no free SID left")  # unreachable while N <= K^L
                    beam = min(beam * 4, full)
                    c2, e2 = _beam_candidates(xs[j : j + 1], books, beam)
                    cand, cerr = c2[0], e2[0]

    def _prefix_free_sids(
        self,
        x: Tensor,
        own: Tensor,
        books: Tensor,
        taken: set[tuple[int, ...]] | dict[tuple[int, ...], int],
        under: dict[tuple[int, ...], int],
        claim: bool = True,
    ) -> Iterator[tuple[int, tuple[int, ...], float]]:
        """For each row of x (n, D), in order, a free SID that keeps the longest prefix of the
        row's own SID own (n, L): the deepest prefix own[:d] with a SID not in `taken` below it
        (`under` counts the taken SIDs below each proper prefix), then the lowest
        ||x - sum_l C_l[c_l]||^2 among the free SIDs there. With `claim`, each SID is added to
        `taken` and `under` before the next row. Yields (row, sid, error).

        Most movers keep the first L-1 codes, so the K last codes are ranked for a whole chunk
        at once; only rows whose L-1 prefix is full search a larger subtree, one by one.
        """
        k, levels = self.config.codebook_size, self.config.levels
        chunk = 256  # bounds the (chunk, K) ranking
        for start in range(0, x.shape[0], chunk):
            xs, owns = x[start : start + chunk], own[start : start + chunk]
            # Residual after the own first L-1 codes; then ||r - C_L[c]||^2 ranks the siblings.
            r = xs - _reconstruct(owns[:, :-1], books[:-1])  # (c, D)
            ranked = _beam_candidates(r, books[-1:], 1)[0][..., 0].tolist()  # (c, K) best first
            for j, sid_own in enumerate(tuple(s) for s in owns.tolist()):
                # The deepest own prefix with room below it: K^(L-d) SIDs lie below a d-prefix.
                roomy = (
                    d
                    for d in range(levels - 1, -1, -1)
                    if under.get(sid_own[:d], 0) < k ** (levels - d)
                )
                depth = next(roomy, None)
                if depth is None:
                    raise RuntimeError("no free SID left")  # unreachable while N <= K^L
                if depth == levels - 1:
                    p = sid_own[:-1]
                    sid = next(p + (c,) for c in ranked[j] if p + (c,) not in taken)
                else:
                    sid = self._best_free_below(xs[j], sid_own[:depth], books, taken)
                if claim:
                    assert isinstance(taken, set)
                    taken.add(sid)
                    _count_prefixes(under, sid)
                e = float(((xs[j] - _reconstruct(torch.tensor([sid]), books)[0]) ** 2).sum())
                yield start + j, sid, e

    def _best_free_below(
        self,
        x: Tensor,
        prefix: tuple[int, ...],
        books: Tensor,
        taken: set[tuple[int, ...]] | dict[tuple[int, ...], int],
    ) -> tuple[int, ...]:
        """The free SID starting with `prefix` with the lowest error for x (D,); the caller
        knows one is free. Exact while the subtree is small (see _EXACT_SIDS), else the beam
        search, widened until it finds a free SID."""
        k, levels = self.config.codebook_size, self.config.levels
        d = len(prefix)
        m = levels - d  # codes left to choose
        full = k ** (m - 1)  # a beam this wide prunes nothing
        r = x[None] - _reconstruct(torch.tensor([prefix], dtype=torch.long), books[:d])  # (1, D)
        small = k**m <= self._EXACT_SIDS and full * x.shape[0] <= self._EXACT_ELEMS
        beam = full if small else min(self._BEAM, full)
        while True:
            cand = _beam_candidates(r, books[d:], beam)[0][0]  # (M, m), best first
            for s in range(0, cand.shape[0], 256):  # most searches stop in the first slice
                for c in cand[s : s + 256].tolist():
                    sid = prefix + tuple(c)
                    if sid not in taken:
                        return sid
            if beam >= full:
                raise RuntimeError(f"no free SID below {prefix}")  # the caller checked
            beam = min(beam * 4, full)

    def _append(
        self,
        item_id: int,
        sid: tuple[int, ...],
        err: float,
        moved: bool,
        own: tuple[int, ...] | None,
    ) -> None:
        self._row[item_id] = len(self._ids)
        self._ids.append(item_id)
        self._sids.append(sid)
        self._item_of[sid] = item_id
        self._err.append(err)
        self._moved.append(moved)
        self._own.append(own)
        _count_prefixes(self._under, sid)
        self._trie._insert(sid)  # every caller gives a tuple of in-range codes
        self._cache.clear()

    def add_item(self, item_id: int, embedding: Tensor) -> tuple[int, ...]:
        """Cold start: give a new item its greedy SID under the frozen codebooks, or if that is
        taken a free one chosen by `config.collision` (as in `fit`, with the greedy SID as the
        item's own), and put it in the trie. Returns the SID."""
        (item_id,) = _check_ids([item_id])
        if item_id in self._row:
            raise ValueError(f"item {item_id} already has a SID {self.sid(item_id)}")
        x = self._as_batch(embedding)
        if x.shape[0] != 1:
            raise ValueError(f"add_item takes one embedding (D,), got {tuple(embedding.shape)}")
        if len(self._ids) >= self.config.capacity:
            raise ValueError(f"all {self.config.capacity} SIDs are in use; cannot add {item_id}")
        books = self.codebooks.to(torch.float64)
        greedy = tuple(_greedy_encode(x, books)[0].tolist())
        if greedy not in self._item_of:
            err = float(((x[0] - _reconstruct(torch.tensor([greedy]), books)[0]) ** 2).sum())
            self._append(item_id, greedy, err, moved=False, own=greedy)
            return greedy
        if self.config.collision == "prefix":
            own = torch.tensor([greedy], dtype=torch.long)
            found = self._prefix_free_sids(x, own, books, self._item_of, self._under, claim=False)
        else:
            found = self._free_sids(x, books, set(self._item_of))
        _, sid, err = next(found)
        self._append(item_id, sid, err, moved=True, own=greedy)
        return sid

    # --- lookups ---------------------------------------------------------------------------

    @property
    def item_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def num_items(self) -> int:
        return len(self._ids)

    @property
    def levels(self) -> int:
        return self.config.levels

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def dim(self) -> int:
        return self.codebooks.shape[2]

    @property
    def trie(self) -> SidTrie:
        return self._trie

    def sid(self, item_id: int) -> tuple[int, ...]:
        row = self._row.get(int(item_id))
        if row is None:
            raise KeyError(f"unknown item id {item_id}")
        return self._sids[row]

    def item(self, sid: Sequence[int]) -> int | None:
        return self._item_of.get(tuple(int(c) for c in sid))

    def _tensor(self, name: str) -> Tensor:
        t = self._cache.get(name)
        if t is not None:
            return t
        codes = torch.tensor(self._sids, dtype=torch.long).reshape(-1, self.levels)  # (N, L)
        ids = torch.tensor(self._ids, dtype=torch.long)  # (N,)
        row_of = torch.full((max(self._ids, default=0) + 1,), -1, dtype=torch.long)
        row_of[ids] = torch.arange(len(ids))
        keys, order = torch.sort(codes @ self._radix)
        self._cache.update(
            codes=codes, ids=ids, row_of=row_of, sorted_keys=keys, sorted_ids=ids[order]
        )
        return self._cache[name]

    def codes(self, item_ids: Sequence[int] | Tensor) -> Tensor:
        """(n,) item ids -> (n, levels) long codes. KeyError for unknown ids."""
        ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1)  # (n,)
        row_of = self._tensor("row_of")
        inside = (ids >= 0) & (ids < row_of.shape[0])
        rows = torch.full_like(ids, -1)
        rows[inside] = row_of[ids[inside]]
        if (rows < 0).any():
            bad = ids[rows < 0][:5].tolist()
            raise KeyError(f"unknown item ids {bad}")
        return self._tensor("codes")[rows]

    def items_for_codes(self, codes: Tensor) -> Tensor:
        """(n, levels) codes -> (n,) item ids, -1 where no item has that SID."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[1] != self.levels:
            raise ValueError(f"codes must be (n, {self.levels}), got {tuple(codes.shape)}")
        keys = self._tensor("sorted_keys")  # (N,)
        if len(keys) == 0:
            return torch.full((codes.shape[0],), -1, dtype=torch.long)
        # Out-of-range codes could alias another SID's key: mask them out.
        valid = ((codes >= 0) & (codes < self.codebook_size)).all(1)  # (n,)
        key = codes.clamp(0, self.codebook_size - 1) @ self._radix  # (n,)
        pos = torch.searchsorted(keys, key).clamp_max(len(keys) - 1)  # (n,)
        found = valid & (keys[pos] == key)
        return torch.where(found, self._tensor("sorted_ids")[pos], torch.full_like(key, -1))

    def _as_batch(self, embedding: Tensor) -> Tensor:
        x = torch.as_tensor(embedding)
        x = x[None] if x.dim() == 1 else x
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (D={self.dim},) or (n, D), got {tuple(x.shape)}")
        return x.detach().to("cpu", torch.float64)

    def encode(self, embedding: Tensor) -> Tensor:
        """Greedy nearest codes under the frozen codebooks, no uniqueness: (D,) -> (levels,),
        (n, D) -> (n, levels)."""
        codes = _greedy_encode(self._as_batch(embedding), self.codebooks.double())
        return codes[0] if torch.as_tensor(embedding).dim() == 1 else codes

    # --- reporting and persistence -----------------------------------------------------------

    def stats(self) -> dict:
        """Codebook usage and cluster sizes per level (on the final SIDs), collision rate, item
        count, mean reconstruction error, and how many moved items changed their code at each
        level (`moved_changed_level`, None if a loaded state did not keep the own SIDs). Plain
        Python values (JSON-able)."""
        codes = self._tensor("codes")  # (N, L)
        k = self.codebook_size
        per_level = []
        for level in range(self.levels):
            sizes = torch.bincount(codes[:, level], minlength=k).double()  # (K,)
            used = int((sizes > 0).sum())
            per_level.append(
                {
                    "codes_used": used,
                    "usage": used / k,
                    "size_min": int(sizes.min()),
                    "size_max": int(sizes.max()),
                    "size_std": float(sizes.std(unbiased=False)),
                }
            )
        n = self.num_items
        moved = sum(self._moved)
        changed: list[int] | None = [0] * self.levels
        for sid, own, m in zip(self._sids, self._own, self._moved, strict=True):
            if not m:
                continue
            if own is None:
                changed = None
                break
            assert changed is not None
            for level in range(self.levels):
                changed[level] += sid[level] != own[level]
        return {
            "num_items": n,
            "levels": per_level,
            "num_moved": moved,
            "moved_changed_level": changed,
            "collision_rate": moved / n if n else 0.0,
            "sid_space_used": n / self.config.capacity,
            "mean_recon_error": sum(self._err) / n if n else 0.0,
        }

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors (for safetensors) and JSON-able metadata; `from_state` inverts it."""
        tensors = {
            "codebooks": self.codebooks.clone(),  # (L, K, D) float32
            "item_ids": self._tensor("ids").clone(),  # (N,) int64
            "codes": self._tensor("codes").clone(),  # (N, L) int64
            "recon_error": torch.tensor(self._err, dtype=torch.float64),  # (N,)
            "moved": torch.tensor(self._moved, dtype=torch.bool),  # (N,)
        }
        if all(o is not None for o in self._own):
            # (N, L) int64: each item's SID before the uniqueness fix.
            tensors["own_codes"] = torch.tensor(self._own, dtype=torch.long).reshape(
                -1, self.levels
            )
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "config": asdict(self.config)}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> SemanticIdTokenizer:
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a v{STATE_VERSION} {STATE_FORMAT} state: "
                f"format={meta.get('format')!r} version={meta.get('version')!r}"
            )
        missing = {"codebooks", "item_ids", "codes", "recon_error", "moved"} - set(tensors)
        if missing:
            raise ValueError(f"state is missing tensors {sorted(missing)}")
        # States from before the collision strategy was configurable used "nearest".
        tok = cls(
            TokenizerConfig(**{"collision": "nearest", **meta["config"]}), tensors["codebooks"]
        )
        ids = tensors["item_ids"].tolist()
        codes = tensors["codes"].tolist()
        err = tensors["recon_error"].tolist()
        moved = tensors["moved"].tolist()
        if not len(ids) == len(codes) == len(err) == len(moved):
            raise ValueError("state tensors disagree on the number of items")
        if "own_codes" in tensors:
            own: list = tensors["own_codes"].tolist()
            if len(own) != len(ids):
                raise ValueError("state tensors disagree on the number of items")
        else:  # unknown for moved items; an item that was not moved kept its own SID
            own = [None if m else c for c, m in zip(codes, moved, strict=True)]
        _check_ids(ids)
        _check_codes(tensors["codes"], tok.config)
        if "own_codes" in tensors:
            _check_codes(tensors["own_codes"], tok.config)
        for item_id, sid, e, m, o in zip(ids, map(tuple, codes), err, moved, own, strict=True):
            if sid in tok._item_of:
                raise ValueError(f"state gives SID {sid} to two items")
            tok._append(item_id, sid, e, bool(m), None if o is None else tuple(o))
        return tok


def _check_codes(codes: Tensor, config: TokenizerConfig) -> None:
    """A state's (N, levels) code table, checked at once (SidTrie._check's rule, per item)."""
    if codes.dim() != 2 or codes.shape[1] != config.levels:
        raise ValueError(f"a SID has {config.levels} codes, got a code table {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size):
        bad = codes[((codes < 0) | (codes >= config.codebook_size)).any(1)][0].tolist()
        raise ValueError(f"SID codes must lie in [0, {config.codebook_size}), got {tuple(bad)}")


def _count_prefixes(under: dict[tuple[int, ...], int], sid: tuple[int, ...]) -> None:
    """Count `sid` below each of its proper prefixes, () included."""
    for depth in range(len(sid)):
        p = sid[:depth]
        under[p] = under.get(p, 0) + 1


def _prefix_counts(sids: set[tuple[int, ...]]) -> dict[tuple[int, ...], int]:
    """Proper prefix -> how many of `sids` lie below it."""
    under: dict[tuple[int, ...], int] = {}
    for sid in sids:
        _count_prefixes(under, sid)
    return under


def _check_ids(item_ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    if any(i < 1 for i in ids):
        raise ValueError("item ids must be >= 1 (0 is the padding id)")
    return ids


# -----------------------------------------------------------------------------
# Collaborative item embeddings (OnePiece's collaborative signal for the residual k-means)


def collaborative_item_embeddings(
    sequences: Sequence[Sequence[int]],
    num_items: int,
    dim: int = 32,
    window: int = 5,
    content: Tensor | None = None,
    content_weight: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """Item embeddings from co-occurrence in users' time-ordered sequences.

    Two items co-occur when they are at most `window` positions apart in one sequence (id 0,
    padding, is dropped first). Positive PMI of the symmetric counts, truncated SVD to `dim`
    (U * sqrt(S), seeded), rows L2-normalised. With `content` (num_items+1, C), e.g. genre
    multi-hot, its L2-normalised rows scaled by `content_weight` are appended.
    Returns (num_items+1, dim [+ C]) float32; row 0 and unseen items' collaborative part are 0.
    """
    if num_items < 1 or dim < 1 or window < 1:
        raise ValueError(f"need num_items, dim, window >= 1, got {num_items}, {dim}, {window}")
    v = num_items + 1
    flat: list[int] = []
    seg: list[int] = []
    for u, s in enumerate(sequences):
        items = [int(i) for i in s if int(i) != 0]
        flat.extend(items)
        seg.extend([u] * len(items))
    items_t = torch.tensor(flat, dtype=torch.long)  # (T,)
    seg_t = torch.tensor(seg, dtype=torch.long)  # (T,)
    if len(flat) and (items_t.min() < 0 or items_t.max() > num_items):
        raise ValueError(f"sequence item ids must lie in [0, {num_items}]")

    # Pairs (t, t+d) for d = 1..window inside one sequence, both directions.
    rows, cols = [], []
    for d in range(1, window + 1):
        a, b = items_t[:-d], items_t[d:]
        ok = (seg_t[:-d] == seg_t[d:]) & (a != b)  # same user, not a re-watch of itself
        rows += [a[ok], b[ok]]
        cols += [b[ok], a[ok]]
    collab = torch.zeros(v, dim, dtype=torch.float64)  # (V, dim)
    r = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
    if r.numel():
        c = torch.cat(cols)
        ones = torch.ones(r.numel(), dtype=torch.float64)
        # coalesce() sums the duplicate (i, j) entries into counts.
        counts = torch.sparse_coo_tensor(
            torch.stack([r, c]), ones, (v, v), check_invariants=True
        ).coalesce()
        (i, j), n_ij = counts.indices(), counts.values()
        marg = torch.zeros(v, dtype=torch.float64).index_add_(0, i, n_ij)  # (V,) row sums
        pmi = torch.log(n_ij * n_ij.sum() / (marg[i] * marg[j]))
        keep = pmi > 0
        ppmi = torch.sparse_coo_tensor(
            torch.stack([i[keep], j[keep]]), pmi[keep], (v, v), check_invariants=True
        )
        q = min(dim + 8, v)  # a few extra components make the leading ones more accurate
        # svd_lowrank draws from the global RNG: seed a fork so callers' RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u_, s_, _ = torch.svd_lowrank(ppmi.coalesce(), q=q, niter=6)
        kdim = min(dim, q)
        emb = u_[:, :kdim] * s_[:kdim].clamp_min(0).sqrt()  # (V, kdim)
        # Fix SVD's sign ambiguity: the largest-magnitude entry of each column is positive.
        pivot = emb.gather(0, emb.abs().argmax(0, keepdim=True))  # (1, kdim)
        emb = emb * torch.where(pivot < 0, -1.0, 1.0)
        collab[:, :kdim] = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    collab[0] = 0.0
    out = collab
    if content is not None:
        if content.dim() != 2 or content.shape[0] != v:
            raise ValueError(f"content must be (num_items+1={v}, C), got {tuple(content.shape)}")
        cont = content.detach().to("cpu", torch.float64)
        cont = cont / cont.norm(dim=1, keepdim=True).clamp_min(1e-12) * content_weight
        cont[0] = 0.0
        out = torch.cat([collab, cont], dim=1)
    return out.to(torch.float32)
