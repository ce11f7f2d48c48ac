"""Semantic-ID tokenizer: balanced residual k-means, unique SIDs (both collision strategies),
the trie, cold start, persistence and the collaborative item embeddings."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time

import pytest
import torch

from models.tokenizer import (
    SemanticIdTokenizer,
    SidTrie,
    TokenizerConfig,
    balanced_kmeans,
    balanced_kmeans_reference,
    codebook_for,
    collaborative_item_embeddings,
    residual_balanced_kmeans,
)
from recloop.config import DataConfig

ML100K = DataConfig().movielens_dir  # read in place, from the configured folder
N, D = 300, 16
CFG = TokenizerConfig(levels=3, codebook_size=8, kmeans_iters=30, seed=0)  # 512 SIDs > 300
CFG_NEAREST = TokenizerConfig(
    levels=3, codebook_size=8, kmeans_iters=30, seed=0, collision="nearest"
)
STRATEGIES = ("prefix", "nearest")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test box has 2 cores shared with other jobs, and OpenMP's spinning barriers make
    # each small op cost tens of ms when a core is busy. Library code leaves threads alone.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_embeddings(n: int = N, d: int = D, centres: int = 12, seed: int = 0) -> torch.Tensor:
    """Clustered points, so that k-means has structure to find and SIDs do collide."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centres, d, generator=g) * 3
    which = torch.randint(0, centres, (n,), generator=g)
    return mu[which] + 0.5 * torch.randn(n, d, generator=g)  # (n, d)


@pytest.fixture(scope="module")
def emb() -> torch.Tensor:
    return make_embeddings()


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return list(range(1, N + 1))


@pytest.fixture(scope="module")
def tok(emb, ids) -> SemanticIdTokenizer:
    return SemanticIdTokenizer.fit(emb, ids, CFG)


@pytest.fixture(scope="module")
def tok_nearest(emb, ids) -> SemanticIdTokenizer:
    return SemanticIdTokenizer.fit(emb, ids, CFG_NEAREST)


def fitted(strategy: str, emb, ids) -> SemanticIdTokenizer:
    return SemanticIdTokenizer.fit(emb, ids, dataclasses.replace(CFG, collision=strategy))


def lex_index(sid, k: int) -> int:
    """Position of a SID in itertools.product(range(k), repeat=len(sid))."""
    return sum(c * k ** (len(sid) - 1 - i) for i, c in enumerate(sid))


def check_prefix_choice(x, own, chosen, books, taken: set, exact: bool = True) -> int:
    """Brute force over every SID: `chosen` is free, no free SID shares a longer prefix with
    `own`, and (if `exact`) none with the same shared prefix reconstructs x (D,) better.
    Returns that shared prefix length."""
    levels, k, _ = books.shape
    every = torch.tensor(list(itertools.product(range(k), repeat=levels)))  # (K^L, L)
    free = torch.tensor([tuple(s) not in taken for s in every.tolist()])
    lcp = (every == torch.tensor(own)).long().cumprod(1).sum(1)  # shared prefix length
    err = ((x.double() - books_sum(books, every)) ** 2).sum(1)  # (K^L,)
    at = lex_index(chosen, k)
    assert tuple(chosen) not in taken and free[at]
    best = int(lcp[free].max())
    assert int(lcp[at]) == best
    tier = free & (lcp == best)
    assert not exact or float(err[at]) <= float(err[tier].min()) + 1e-9
    return best


def all_prefixes(sids) -> dict[tuple[int, ...], set[int]]:
    children: dict[tuple[int, ...], set[int]] = {}
    for s in sids:
        for depth in range(len(s)):
            children.setdefault(tuple(s[:depth]), set()).add(s[depth])
    return children


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"levels": 0}, "levels must be >= 1"),
        ({"codebook_size": 1}, "codebook_size must be >= 2"),
        ({"kmeans_iters": 0}, "kmeans_iters must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"levels": 2.0}, "levels must be an int"),
        ({"levels": 20, "codebook_size": 1024}, "too large"),
        ({"collision": "closest"}, "collision must be one of"),
        ({"collision": None}, "collision must be one of"),
    ],
)
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TokenizerConfig(**kwargs)


def test_the_default_collision_strategy_is_prefix(tok):
    assert TokenizerConfig().collision == "prefix"
    assert CFG.collision == "prefix" and tok.config.collision == "prefix"


# --- balanced k-means ---------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(300, 8), (301, 8), (307, 8), (50, 7)])
def test_balanced_kmeans_sizes_are_floor_or_ceil_and_extras_go_first(n, k):
    x = make_embeddings(n=n).double()
    centroids, assign = balanced_kmeans(x, k, 20, torch.Generator().manual_seed(1))
    sizes = torch.bincount(assign, minlength=k).tolist()
    assert centroids.shape == (k, D) and assign.shape == (n,)
    expected = [n // k + (1 if c < n % k else 0) for c in range(k)]
    assert sizes == expected
    # Centroids are the means of their clusters.
    for c in range(k):
        torch.testing.assert_close(centroids[c], x[assign == c].mean(0))


def test_balanced_kmeans_beats_its_random_init():
    # The iterations must actually improve the fit, not just hand out capacity.
    x = make_embeddings(n=200).double()
    k = 8
    c1, a1 = balanced_kmeans(x, k, 1, torch.Generator().manual_seed(0))
    c30, a30 = balanced_kmeans(x, k, 30, torch.Generator().manual_seed(0))
    sse1 = ((x - c1[a1]) ** 2).sum()
    sse30 = ((x - c30[a30]) ** 2).sum()
    assert sse30 < 0.9 * sse1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n, k, iters", [(37, 5, 10), (24, 4, 1), (40, 8, 30)])
def test_fast_balanced_kmeans_matches_the_reference(seed, n, k, iters):
    x = make_embeddings(n=n, d=3, centres=4, seed=seed).double()
    c_fast, a_fast = balanced_kmeans(x, k, iters, torch.Generator().manual_seed(seed))
    c_ref, a_ref = balanced_kmeans_reference(x, k, iters, torch.Generator().manual_seed(seed))
    assert torch.equal(a_fast, a_ref)
    torch.testing.assert_close(c_fast, c_ref)


@pytest.mark.parametrize("seed", range(3))
def test_fast_and_reference_break_distance_ties_alike(seed):
    # Integer points and one iteration (centroids are data points): every distance is exact,
    # so there are many true ties, which both must give to the lower index.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (30, 2), generator=g).double()
    a_fast = balanced_kmeans(x, 4, 1, torch.Generator().manual_seed(seed))[1]
    a_ref = balanced_kmeans_reference(x, 4, 1, torch.Generator().manual_seed(seed))[1]
    assert torch.equal(a_fast, a_ref)


def test_balanced_kmeans_edge_cases():
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least k=7 points"):
        balanced_kmeans(x, 7, 5)
    with pytest.raises(ValueError, match="at least k=7 points"):
        balanced_kmeans_reference(x, 7, 5)
    # N == K: one point per cluster, and each centroid is its point.
    centroids, assign = balanced_kmeans(x, 6, 5, torch.Generator().manual_seed(0))
    assert sorted(assign.tolist()) == list(range(6))
    torch.testing.assert_close(centroids[assign], x)


def test_residual_kmeans_is_balanced_at_every_level_and_quantises_residuals(emb):
    x = emb.double()
    books, greedy = residual_balanced_kmeans(x, CFG)
    assert books.shape == (3, 8, D) and greedy.shape == (N, 3)
    for level in range(3):
        sizes = torch.bincount(greedy[:, level], minlength=8)
        assert set(sizes.tolist()) <= {N // 8, -(-N // 8)}
    # Level l's codebook is fitted on what levels < l left over: the residual shrinks.
    residual, norms = x, []
    for level in range(3):
        residual = residual - books[level][greedy[:, level]]
        norms.append(float((residual**2).sum()))
    assert norms[0] > norms[1] > norms[2]


# --- the tokenizer ------------------------------------------------------------------------


def test_every_item_gets_a_unique_sid_and_lookups_invert(tok, ids):
    sids = [tok.sid(i) for i in ids]
    assert len(set(sids)) == N
    assert all(len(s) == 3 and all(0 <= c < 8 for c in s) for s in sids)
    assert all(s in tok.trie for s in sids) and len(tok.trie) == N
    assert all(tok.item(tok.sid(i)) == i for i in ids)
    assert tok.item_ids == ids and tok.num_items == N
    assert tok.levels == 3 and tok.codebook_size == 8
    codes = tok.codes(ids)
    assert codes.shape == (N, 3) and codes.dtype == torch.long
    assert [tuple(r) for r in codes.tolist()] == sids
    assert torch.equal(tok.items_for_codes(codes), torch.tensor(ids))
    assert torch.equal(tok.codes(torch.tensor(ids[::-1])), codes.flip(0))


def test_unknown_lookups(tok):
    free = next(s for s in itertools.product(range(8), repeat=3) if s not in tok.trie)
    assert tok.item(free) is None
    codes = torch.tensor([list(free), list(tok.sid(5)), [8, 0, 0], [-1, 0, 0]])
    assert tok.items_for_codes(codes).tolist() == [-1, 5, -1, -1]
    with pytest.raises(KeyError):
        tok.sid(N + 1)
    with pytest.raises(KeyError):
        tok.codes([1, N + 1])
    with pytest.raises(KeyError):
        tok.codes([-3])


def test_fit_rejects_bad_inputs(emb, ids):
    with pytest.raises(ValueError, match="only codebook_size\\*\\*levels = 8 exist"):
        SemanticIdTokenizer.fit(emb[:9], ids[:9], TokenizerConfig(levels=1, codebook_size=8))
    with pytest.raises(ValueError, match="at least codebook_size=8"):
        SemanticIdTokenizer.fit(emb[:7], ids[:7], CFG)
    with pytest.raises(ValueError, match="unique"):
        SemanticIdTokenizer.fit(emb[:10], [1] * 10, CFG)
    with pytest.raises(ValueError, match="padding"):
        SemanticIdTokenizer.fit(emb[:10], range(10), CFG)
    with pytest.raises(ValueError, match="to match item_ids"):
        SemanticIdTokenizer.fit(emb[:10], ids[:11], CFG)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_full_sid_space_is_still_unique(emb, strategy):
    # N == K^levels: every SID is used, so the free-SID search must reach the last one.
    cfg = TokenizerConfig(levels=2, codebook_size=4, seed=3, collision=strategy)
    t = SemanticIdTokenizer.fit(emb[:16], range(1, 17), cfg)
    assert sorted(t.sid(i) for i in range(1, 17)) == list(itertools.product(range(4), repeat=2))
    with pytest.raises(ValueError, match="all 16 SIDs are in use"):
        t.add_item(17, emb[0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_nearly_full_sid_space_widens_the_beam(emb, strategy):
    # 250 items in 4^4 = 256 SIDs: late movers find every SID of the first, narrow beam (or,
    # with "prefix", of their own subtrees) taken.
    cfg = TokenizerConfig(levels=4, codebook_size=4, seed=0, collision=strategy)
    t = SemanticIdTokenizer.fit(emb[:250], range(1, 251), cfg)
    sids = {t.sid(i) for i in range(1, 251)}
    assert len(sids) == 250 and t.stats()["num_moved"] > 64
    for k in range(6):
        t.add_item(1000 + k, emb[k])
    assert len({t.sid(i) for i in t.item_ids}) == 256 == len(t.trie)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_colliding_items_are_moved_and_the_closest_keeps_the_sid(emb, ids, strategy):
    tok = fitted(strategy, emb, ids)
    books, greedy = residual_balanced_kmeans(emb.double(), CFG)
    final = tok.codes(ids)
    moved = (final != greedy).any(1)
    stats = tok.stats()
    assert stats["num_moved"] == int(moved.sum()) > 0  # the clustered data does collide
    assert stats["collision_rate"] == pytest.approx(float(moved.float().mean()))
    changed = (final != greedy)[moved].sum(0).tolist()
    assert stats["moved_changed_level"] == changed and changed[-1] > 0
    # Every greedy SID that was claimed is kept by exactly its closest claimant.
    b = tok.codebooks.double()
    err = ((emb.double() - books_sum(b, greedy)) ** 2).sum(1)
    keys = [tuple(r) for r in greedy.tolist()]
    for key in set(keys):
        claim = [i for i, k in enumerate(keys) if k == key]
        keeper = min(claim, key=lambda i: (float(err[i]), i))
        assert not moved[keeper]
        assert all(moved[i] for i in claim if i != keeper)


def test_nearest_moves_to_the_nearest_free_sid(emb, ids, tok_nearest):
    tok = tok_nearest
    _, greedy = residual_balanced_kmeans(emb.double(), CFG_NEAREST)
    final = tok.codes(ids)
    moved = (final != greedy).any(1)
    assert int(moved.sum()) == tok.stats()["num_moved"] > 0
    b = tok.codebooks.double()
    # A moved item takes the free SID nearest to it: no unused SID reconstructs it better.
    used = {tuple(r) for r in final.tolist()}
    free = [s for s in itertools.product(range(8), repeat=3) if s not in used]
    free_t = torch.tensor(free)
    # (The beam search is exact here: 16 prefixes of 64 kept, and no mover needs more.)
    for i in torch.nonzero(moved).flatten().tolist():
        own = float(((emb[i].double() - books_sum(b, final[i : i + 1])[0]) ** 2).sum())
        best_free = float(((emb[i].double() - books_sum(b, free_t)) ** 2).sum(1).min())
        assert own <= best_free + 1e-9


def books_sum(books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return sum(books[level][codes[:, level]] for level in range(codes.shape[1]))


# (levels, K, N, whether some movers must give up more than the last code)
PREFIX_CASES = [
    pytest.param(3, 8, 300, True, id="300-in-8^3"),
    pytest.param(3, 4, 60, True, id="60-in-4^3"),
    pytest.param(4, 4, 250, True, id="250-in-4^4"),
    pytest.param(2, 8, 64, False, id="full-8^2"),
]


def replay_prefix_fit(emb, levels, k, n, exact=True):
    """Fit with "prefix" and check every move against brute force, replaying fit's order:
    each greedy SID's closest claimant keeps it, then the others move one by one in order of
    their greedy error, each seeing the SIDs taken before it. Returns the tokenizer, the greedy
    and final codes (n, L) and the shared prefix length of each move."""
    cfg = TokenizerConfig(levels=levels, codebook_size=k, seed=0)
    x = emb[:n]
    t = SemanticIdTokenizer.fit(x, range(1, n + 1), cfg)
    _, greedy = residual_balanced_kmeans(x.double(), cfg)
    b = t.codebooks.double()
    final = t.codes(list(range(1, n + 1)))
    err = ((x.double() - books_sum(b, greedy)) ** 2).sum(1)
    taken: set = set()
    movers = []
    for i in torch.argsort(err, stable=True).tolist():
        g = tuple(greedy[i].tolist())
        if g in taken:
            movers.append(i)
        else:
            taken.add(g)
            assert tuple(final[i].tolist()) == g
    shared = []
    for i in movers:
        sid = tuple(final[i].tolist())
        shared.append(check_prefix_choice(x[i], greedy[i].tolist(), sid, b, taken, exact))
        taken.add(sid)
    assert len(taken) == n and len(movers) == t.stats()["num_moved"] > 0
    return t, greedy, final, shared


@pytest.mark.parametrize("levels, k, n, deep", PREFIX_CASES)
def test_prefix_moves_keep_the_longest_free_prefix(emb, levels, k, n, deep):
    t, greedy, final, shared = replay_prefix_fit(emb, levels, k, n)
    # Most keep all but the last code; the crowded cases also reach the deeper fallbacks.
    assert max(shared) == levels - 1
    assert (min(shared) < levels - 1) == deep
    moved = (final != greedy).any(1)
    assert t.stats()["moved_changed_level"] == (final != greedy)[moved].sum(0).tolist()


def test_prefix_search_of_a_large_subtree_falls_back_to_the_widening_beam(emb, monkeypatch):
    # Subtrees too large to rank exactly are searched with the beam, widened until it finds a
    # free SID: the prefix stays the longest free one and SIDs stay unique, only the pick
    # within the subtree may not be the very best.
    monkeypatch.setattr(SemanticIdTokenizer, "_EXACT_SIDS", 4)
    monkeypatch.setattr(SemanticIdTokenizer, "_BEAM", 1)
    t, _, _, shared = replay_prefix_fit(emb, 4, 4, 250, exact=False)
    assert min(shared) < 3  # the beam path ran
    for k in range(6):
        t.add_item(1000 + k, emb[k])
    assert len({t.sid(i) for i in t.item_ids}) == 256 == len(t.trie)


@pytest.mark.parametrize("levels, k, n, deep", PREFIX_CASES)
def test_prefix_changes_a_code_only_below_a_full_subtree(emb, levels, k, n, deep):
    t = SemanticIdTokenizer.fit(emb[:n], range(1, n + 1), TokenizerConfig(levels, k, seed=0))
    _, greedy = residual_balanced_kmeans(emb[:n].double(), t.config)
    final = t.codes(list(range(1, n + 1)))
    used = [tuple(r) for r in final.tolist()]
    for i in torch.nonzero((final != greedy).any(1)).flatten().tolist():
        # The first code it gave up: every SID below the own prefix up to that code was taken
        # (at the move, hence still at the end).
        first = int(torch.nonzero(final[i] != greedy[i])[0])
        own = tuple(greedy[i, : first + 1].tolist())
        below = sum(1 for s in used if s[: first + 1] == own)
        assert below == k ** (levels - first - 1)
    # Level 1 holds ceil(N/K) <= K^(L-1) items per code, so its codes never change in fit: the
    # level-1 balance of the k-means survives the uniqueness fix.
    assert torch.equal(final[:, 0], greedy[:, 0])
    assert t.stats()["moved_changed_level"][0] == 0
    sizes = torch.bincount(final[:, 0], minlength=k)
    assert set(sizes.tolist()) <= {n // k, -(-n // k)}


def test_encode_is_greedy_nearest_per_level(tok, emb):
    x = emb[:40].double()
    b = tok.codebooks.double()
    residual, expect = x, []
    for level in range(3):
        c = torch.cdist(residual, b[level]).argmin(1)
        expect.append(c)
        residual = residual - b[level][c]
    codes = tok.encode(emb[:40])
    assert codes.shape == (40, 3)
    assert torch.equal(codes, torch.stack(expect, 1))
    assert torch.equal(tok.encode(emb[7]), codes[7])
    with pytest.raises(ValueError, match="D=16"):
        tok.encode(torch.zeros(5, 3))


# --- the trie -----------------------------------------------------------------------------


def test_trie_agrees_with_brute_force(tok, ids):
    sids = {tok.sid(i) for i in ids}
    children = all_prefixes(sids)
    trie = tok.trie
    for prefix, nxt in children.items():
        assert trie.allowed(prefix) == sorted(nxt)
    assert trie.allowed(()) == sorted({s[0] for s in sids})
    # Prefixes that lead nowhere, and complete SIDs, allow nothing.
    dead = next(p for p in itertools.product(range(8), repeat=2) if p not in children)
    assert trie.allowed(dead) == [] and trie.allowed(next(iter(sids))) == []
    rng = random.Random(0)
    absent = [s for s in itertools.product(range(8), repeat=3) if s not in sids]
    for s in rng.sample(absent, 20):
        assert s not in trie
    assert (0, 0) not in trie and "abc" not in trie and 3 not in trie

    # Batched masks: mixed lengths, unknown and complete prefixes in one call.
    prefixes = [(), dead, *rng.sample(sorted(children), 30), next(iter(sids))]
    mask = trie.next_mask(prefixes)
    assert mask.shape == (len(prefixes), 8) and mask.dtype == torch.bool
    for row, p in zip(mask.tolist(), prefixes, strict=True):
        assert [c for c in range(8) if row[c]] == sorted(children.get(tuple(p), ()))
    assert trie.next_mask([]).shape == (0, 8)


def test_trie_insert_updates_masks_and_validates():
    trie = SidTrie(codebook_size=4, levels=2)
    assert trie.allowed(()) == [] and not trie.next_mask([()]).any()
    trie.insert((1, 2))
    trie.insert([1, 3])
    trie.insert((1, 2))  # duplicates are a no-op
    assert len(trie) == 2 and list(trie) == [(1, 2), (1, 3)]
    assert trie.allowed(()) == [1] and trie.allowed((1,)) == [2, 3]
    assert trie.next_mask([(), (1,), (0,)]).tolist() == [
        [False, True, False, False],
        [False, False, True, True],
        [False, False, False, False],
    ]
    # A mask handed out earlier is a copy: later inserts do not change it.
    before = trie.next_mask([(1,)])
    trie.insert((1, 0))
    assert before.tolist() == [[False, False, True, True]]
    assert trie.next_mask([(1,)]).tolist() == [[True, False, True, True]]
    with pytest.raises(ValueError, match="has 2 codes"):
        trie.insert((1,))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        trie.insert((1, 4))


# --- cold start ---------------------------------------------------------------------------


def test_add_item_gives_a_fresh_unique_decodable_sid(emb, ids):
    t = SemanticIdTokenizer.fit(emb, ids, CFG)
    # An existing item whose SID is exactly its greedy code: a twin must collide and move.
    twin_of = next(i for i in ids if tuple(t.encode(emb[i - 1]).tolist()) == t.sid(i))
    sid = t.add_item(1000, emb[twin_of - 1].clone())
    assert sid != t.sid(twin_of)
    assert t.stats()["num_moved"] == SemanticIdTokenizer.fit(emb, ids, CFG).stats()["num_moved"] + 1
    # A new item far from everything: it gets its greedy code if that is free.
    far = emb.mean(0) + 0.01
    sid2 = t.add_item(1001, far)
    sids = [t.sid(i) for i in t.item_ids]
    assert len(set(sids)) == N + 2 == t.num_items and len(t.trie) == N + 2
    for new_id, s in ((1000, sid), (1001, sid2)):
        assert s in t.trie and t.item(s) == new_id and t.sid(new_id) == s
        assert t.items_for_codes(torch.tensor([list(s)])).tolist() == [new_id]
        assert t.codes([new_id]).tolist() == [list(s)]
        # Decodable at once: walking the trie's masks reaches it.
        for depth in range(3):
            assert t.trie.next_mask([s[:depth]])[0, s[depth]]
    with pytest.raises(ValueError, match="already has a SID"):
        t.add_item(1000, far)
    with pytest.raises(ValueError, match="one embedding"):
        t.add_item(1002, emb[:2])


def test_prefix_cold_start_keeps_the_longest_free_prefix(emb):
    # 12 items in 4^2 = 16 SIDs: 3 per level-1 code, so a code has 1 free SID below it. Twins
    # of one item all have its SID as their own: the first stays under its level-1 code, the
    # next finds that code full and must change it, to the best free SID anywhere.
    cfg = TokenizerConfig(levels=2, codebook_size=4, seed=0)
    t = SemanticIdTokenizer.fit(emb[:12], range(1, 13), cfg)
    before = t.stats()["moved_changed_level"]
    b = t.codebooks.double()
    item = next(i for i in range(1, 13) if tuple(t.encode(emb[i - 1]).tolist()) == t.sid(i))
    own = t.sid(item)
    shared, sids = [], []
    for new_id in (100, 101, 102):
        taken = set(t.trie)
        under_own = sum(1 for s in taken if s[0] == own[0])
        sid = t.add_item(new_id, emb[item - 1].clone())
        shared.append(check_prefix_choice(emb[item - 1], own, sid, b, taken))
        sids.append(sid)
        # Level 1 changes exactly when no SID is free below the own level-1 code.
        assert (sid[0] != own[0]) == (under_own == 4)
    assert shared == [1, 0, 0] and len(set(t.trie)) == 15
    after = t.stats()["moved_changed_level"]
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == sum(s[1] != own[1] for s in sids)


# --- determinism and persistence ----------------------------------------------------------


def test_fit_is_deterministic_under_the_seed(emb, ids, tok):
    again = SemanticIdTokenizer.fit(emb, ids, CFG)
    assert torch.equal(again.codebooks, tok.codebooks)
    assert torch.equal(again.codes(ids), tok.codes(ids))
    other = SemanticIdTokenizer.fit(emb, ids, TokenizerConfig(levels=3, codebook_size=8, seed=1))
    assert not torch.allclose(other.codebooks, tok.codebooks)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_round_trips_through_safetensors(tmp_path, emb, ids, strategy):
    from safetensors.torch import load_file, save_file

    t = fitted(strategy, emb, ids)
    t.add_item(5000, emb[3])
    tensors, meta = t.state()
    path = tmp_path / "tokenizer.safetensors"
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
    # What comes back is plain tensors and a JSON string: no pickle.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta_back = json.loads(f.metadata()["meta"])
    back = SemanticIdTokenizer.from_state(load_file(str(path)), meta_back)

    all_ids = ids + [5000]
    assert back.config == t.config and back.item_ids == all_ids
    assert back.config.collision == meta_back["config"]["collision"] == strategy
    assert torch.equal(back.codebooks, t.codebooks)
    assert torch.equal(back.codes(all_ids), t.codes(all_ids))
    assert set(back.trie) == set(t.trie)
    assert back.trie.allowed(()) == t.trie.allowed(())
    assert back.stats() == t.stats()
    assert torch.equal(back.encode(emb[:10]), t.encode(emb[:10]))
    # The loaded one keeps working: a cold-start item lands where it would have.
    assert back.add_item(5001, emb[9]) == t.add_item(5001, emb[9])
    with pytest.raises(ValueError, match="not a v1"):
        SemanticIdTokenizer.from_state(tensors, {**meta, "version": 99})
    with pytest.raises(ValueError, match="two items"):
        dup = dict(tensors, codes=torch.zeros_like(tensors["codes"]))
        SemanticIdTokenizer.from_state(dup, meta)
    with pytest.raises(ValueError, match="collision must be one of"):
        SemanticIdTokenizer.from_state(
            tensors, {**meta, "config": {**meta["config"], "collision": "x"}}
        )
    # A damaged code table is refused as a whole, before any item is taken in.
    bad = tensors["codes"].clone()
    bad[7, 1] = t.config.codebook_size
    with pytest.raises(ValueError, match="SID codes must lie in"):
        SemanticIdTokenizer.from_state(dict(tensors, codes=bad), meta)
    with pytest.raises(ValueError, match="a SID has"):
        SemanticIdTokenizer.from_state(dict(tensors, codes=tensors["codes"][:, :-1]), meta)
    with pytest.raises(ValueError, match="SID codes must lie in"):
        SemanticIdTokenizer.from_state(dict(tensors, own_codes=-tensors["own_codes"] - 1), meta)


def test_older_states_load_as_nearest(emb, ids, tok_nearest):
    # Written before the strategy was configurable: no "collision" in the config, and no own
    # SIDs, so how far moved items went is unknown.
    tensors, meta = tok_nearest.state()
    config = {k: v for k, v in meta["config"].items() if k != "collision"}
    old = {k: v for k, v in tensors.items() if k != "own_codes"}
    back = SemanticIdTokenizer.from_state(old, {**meta, "config": config})
    assert back.config == CFG_NEAREST and back.config.collision == "nearest"
    assert torch.equal(back.codes(ids), tok_nearest.codes(ids))
    s, ref = back.stats(), tok_nearest.stats()
    assert s["moved_changed_level"] is None and ref["moved_changed_level"] is not None
    assert {**s, "moved_changed_level": None} == {**ref, "moved_changed_level": None}
    # It resolves cold-start collisions as a "nearest" tokenizer does.
    fresh = SemanticIdTokenizer.fit(emb, ids, CFG_NEAREST)
    twin = next(i for i in ids if tuple(fresh.encode(emb[i - 1]).tolist()) == fresh.sid(i))
    assert back.add_item(5000, emb[twin - 1]) == fresh.add_item(5000, emb[twin - 1])
    # ...and knows how far that one moved, but not the loaded ones.
    assert back.stats()["moved_changed_level"] is None
    assert fresh.stats()["moved_changed_level"] is not None


# --- stats --------------------------------------------------------------------------------


def test_stats(tok, ids, emb):
    s = tok.stats()
    assert s["num_items"] == N and len(s["levels"]) == 3
    codes = tok.codes(ids)
    for level, lv in enumerate(s["levels"]):
        sizes = torch.bincount(codes[:, level], minlength=8)
        assert 0.0 <= lv["usage"] <= 1.0
        assert lv["codes_used"] == int((sizes > 0).sum()) and lv["usage"] == lv["codes_used"] / 8
        assert (lv["size_min"], lv["size_max"]) == (int(sizes.min()), int(sizes.max()))
        assert lv["size_std"] == pytest.approx(float(sizes.double().std(unbiased=False)))
    assert 0.0 <= s["collision_rate"] <= 1.0
    assert s["num_moved"] == round(s["collision_rate"] * N)
    changed = s["moved_changed_level"]
    assert len(changed) == 3 and all(0 <= c <= s["num_moved"] for c in changed)
    assert changed[-1] > 0  # a moved item changes at least one code, mostly the last
    recon = books_sum(tok.codebooks.double(), codes)
    mse = float(((emb.double() - recon) ** 2).sum(1).mean())
    assert s["mean_recon_error"] == pytest.approx(mse, rel=1e-6)
    json.dumps(s)  # plain Python values


# --- collaborative embeddings -------------------------------------------------------------


def planted_sequences(seed: int = 0) -> list[list[int]]:
    """Users 0..39 watch only items 1..20, users 40..79 only items 21..40; item 41 is unseen."""
    rng = random.Random(seed)
    seqs = []
    for u in range(80):
        pool = list(range(1, 21)) if u < 40 else list(range(21, 41))
        seqs.append([rng.choice(pool) for _ in range(rng.randint(5, 15))] + [0])
    return seqs


def test_collaborative_embeddings_put_co_watched_items_together():
    e = collaborative_item_embeddings(planted_sequences(), num_items=41, dim=8, window=3)
    assert e.shape == (42, 8) and e.dtype == torch.float32
    assert torch.equal(e[0], torch.zeros(8)) and torch.equal(e[41], torch.zeros(8))
    torch.testing.assert_close(e[1:41].norm(dim=1), torch.ones(40))
    sim = e[1:41] @ e[1:41].T  # (40, 40) cosine
    group = torch.arange(40) < 20
    same = group[:, None] == group[None, :]
    off_diag = ~torch.eye(40, dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.5
    # Every item's nearest neighbour is from its own group.
    nn = sim.masked_fill(~off_diag, -2).argmax(1)
    assert torch.equal(group[nn], group)


def test_collaborative_embeddings_match_a_dense_reference():
    # Count pairs by hand, PPMI, exact eigendecomposition: with dim >= the item count the
    # truncated SVD loses nothing, so the cosines U S U^T must agree.
    seqs = [[1, 2, 3, 0, 4, 1], [2, 2, 5, 6], [6, 5, 4, 3], [7], [1, 3, 5, 7, 8]]
    n, window = 9, 2
    counts = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for s in seqs:
        s = [i for i in s if i != 0]
        for p, q in itertools.combinations(range(len(s)), 2):
            if q - p <= window and s[p] != s[q]:
                counts[s[p], s[q]] += 1
                counts[s[q], s[p]] += 1
    marg = counts.sum(1)
    with torch.no_grad():
        pmi = torch.log(counts * counts.sum() / (marg[:, None] * marg[None, :]))
    ppmi = torch.nan_to_num(pmi, nan=0.0, neginf=0.0).clamp_min(0)
    lam, vec = torch.linalg.eigh(ppmi)
    gram = vec @ torch.diag(lam.abs()) @ vec.T  # U S U^T
    seen = marg > 0  # item 9 is never watched
    norm = gram.diagonal().sqrt()
    cos_ref = (gram / norm[:, None] / norm[None, :])[seen][:, seen]
    e = collaborative_item_embeddings(seqs, num_items=n, dim=n + 1, window=window).double()
    assert torch.equal(e[~seen], torch.zeros(int((~seen).sum()), n + 1))
    torch.testing.assert_close(e[seen] @ e[seen].T, cos_ref, atol=1e-4, rtol=0)


def test_collaborative_embeddings_are_deterministic_and_take_content():
    seqs = planted_sequences()
    rng_before = torch.random.get_rng_state()
    a = collaborative_item_embeddings(seqs, num_items=41, dim=8)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # callers' RNG untouched
    assert torch.equal(a, collaborative_item_embeddings(seqs, num_items=41, dim=8))
    content = torch.zeros(42, 3)
    content[1:, 0] = 1.0
    content[41] = torch.tensor([0.0, 3.0, 4.0])
    c = collaborative_item_embeddings(seqs, num_items=41, dim=8, content=content, content_weight=2)
    assert c.shape == (42, 11)
    torch.testing.assert_close(c[:, :8], a)
    torch.testing.assert_close(c[41], torch.tensor([0.0] * 8 + [0.0, 1.2, 1.6]))
    torch.testing.assert_close(c[1:41, 8:].norm(dim=1), torch.full((40,), 2.0))
    assert torch.equal(c[0], torch.zeros(11))
    with pytest.raises(ValueError, match="lie in"):
        collaborative_item_embeddings([[1, 42]], num_items=41)
    with pytest.raises(ValueError, match="content must be"):
        collaborative_item_embeddings(seqs, num_items=41, content=torch.zeros(41, 3))


# --- real data ----------------------------------------------------------------------------


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="MovieLens-100k not present")
def test_movielens_100k_fit(capsys):
    import pandas as pd

    df = pd.read_csv(ML100K / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    seqs = df.sort_values(["user", "ts", "item"]).groupby("user")["item"].apply(list).tolist()
    n_items = int(df["item"].max())
    content = None
    if (ML100K / "u.item").exists():
        items = pd.read_csv(ML100K / "u.item", sep="|", header=None, encoding="latin-1")
        content = torch.zeros(n_items + 1, 19)
        content[torch.tensor(items[0].values)] = torch.tensor(
            items.iloc[:, 5:24].values, dtype=torch.float32
        )
    start = time.perf_counter()
    emb = collaborative_item_embeddings(seqs, n_items, dim=32, window=5, content=content)
    mid = time.perf_counter()
    cfg = TokenizerConfig(levels=3, codebook_size=32)  # "prefix"
    t = SemanticIdTokenizer.fit(emb[1:], range(1, n_items + 1), cfg)
    end = time.perf_counter()
    near_cfg = dataclasses.replace(cfg, collision="nearest")
    near = SemanticIdTokenizer.fit(emb[1:], range(1, n_items + 1), near_cfg)
    near_s = time.perf_counter() - end
    _, greedy = residual_balanced_kmeans(emb[1:].double(), cfg)
    for level in range(3):
        sizes = torch.bincount(greedy[:, level], minlength=32)
        assert set(sizes.tolist()) <= {n_items // 32, -(-n_items // 32)}
    balanced = {n_items // 32, -(-n_items // 32)}
    for tk in (t, near):
        assert tk.num_items == n_items == 1682
        assert len({tk.sid(i) for i in tk.item_ids}) == n_items
    s, ns = t.stats(), near.stats()
    assert s["num_moved"] == ns["num_moved"] > 0  # the same items collide either way
    # "prefix" keeps the level-1 balance (no level-1 code can fill its 1024 SIDs) ...
    assert s["moved_changed_level"][0] == 0
    assert {s["levels"][0]["size_min"], s["levels"][0]["size_max"]} <= balanced
    # ... where "nearest" moves items across level-1 codes.
    assert ns["moved_changed_level"][0] > 0
    with capsys.disabled():
        print(f"\n[ml-100k] embeddings {mid - start:.2f} s, fit {end - mid:.2f} s (prefix)")
        print("[ml-100k] prefix " + json.dumps(s))
        print(f"[ml-100k] nearest fit {near_s:.2f} s " + json.dumps(ns))
    assert end - mid < 10


def test_the_codebook_fits_the_catalogue():
    """The default K leaves the SID tree at most half full: MovieLens-100k keeps its
    measured 16 codes; a 23 000-item catalogue, which 16**3 cannot hold, gets 64 (it
    stopped with an error before); the refusal of a too-small K names the K that fits."""
    from pipelines.offline.pretrain import default_config

    assert codebook_for(1682) == 16 and codebook_for(2048) == 16
    assert codebook_for(2049) == 32 and codebook_for(23_000) == 64
    assert default_config(num_items=1682).model.codebook_size == 16
    big = default_config(num_items=23_000)
    assert big.model.codebook_size == big.tokenizer.codebook_size == 64
    assert default_config(num_items=23_000, codebook_size=32).model.codebook_size == 32
    with pytest.raises(ValueError):
        codebook_for(0)

    n, levels = 600, 2
    k = codebook_for(n, levels, smallest=4)
    assert k == 64 and k**levels >= 2 * n > (k // 2) ** levels
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(n, 8, generator=gen)
    cfg = TokenizerConfig(levels=levels, codebook_size=k, kmeans_iters=5)
    tok = SemanticIdTokenizer.fit(emb, list(range(1, n + 1)), cfg)
    assert len({tok.sid(i) for i in range(1, n + 1)}) == n
    with pytest.raises(ValueError, match=r"codebook_for\(600, 2\) = 64"):
        SemanticIdTokenizer.fit(
            emb, list(range(1, n + 1)), dataclasses.replace(cfg, codebook_size=16)
        )
