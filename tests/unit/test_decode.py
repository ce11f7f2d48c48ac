"""The fast decode path of beam search against its cache-less reference twin.

Every case decodes the same requests with ``beam_search`` (beams sharing their request's
encoder output, preallocated KV buffers reordered by index, the MoE's inference path) and
``beam_search_reference`` (the whole prefix re-decoded at each step, every beam its own
copy of the encoder output): the same items and codes per beam, scores within 1e-4."""

from __future__ import annotations

import pytest
import torch

from models.beam_search import (
    ELEMENTWISE_ATTN_ROWS,
    SPLIT_QKV_ROWS,
    CompiledTrie,
    beam_search,
    beam_search_reference,
)
from models.onerec import DENSE_GATE_MAX, OneRec, OneRecConfig
from tests.unit.test_onerec import tiny_config

K, L, N_ITEMS = 8, 3, 120


def config(**kw) -> OneRecConfig:
    return tiny_config(**kw)  # the model tests' tiny config (K = 8, L = 3)


def catalogue(n: int = N_ITEMS, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(K**L, generator=g)[:n]
    return torch.stack([flat // (K * K), (flat // K) % K, flat % K], dim=1)  # (n, L)


def build(kind: str, trained: bool) -> tuple[OneRec, torch.Tensor]:
    torch.manual_seed(0)
    codes = catalogue()
    opts = {
        "moe": {},
        "dense": {"moe_experts": 0},
        "leaf": {"item_vocab": N_ITEMS + 1, "leaf_logits": True},
        "tree": {"item_vocab": N_ITEMS + 1, "tree_logits": True},
    }[kind]
    model = OneRec(config(**opts))
    if model.item_emb is not None:
        with torch.no_grad():
            model.item_emb.weight[1:].normal_(std=0.5)
        model.set_leaf_items(torch.cat([torch.zeros(1, L, dtype=torch.long), codes]))
    if trained:  # a few optimizer steps on random sessions: weights away from their init
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            hist = torch.randint(1, N_ITEMS + 1, (16, 10), generator=g)
            target = torch.randint(1, N_ITEMS + 1, (16, 3), generator=g)
            loss, _ = model(
                codes[hist - 1],
                torch.ones(16, 10, dtype=torch.bool),
                codes[target - 1],
                history_items=hist if model.item_emb is not None else None,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), codes


def requests(model: OneRec, codes: torch.Tensor, batch: int, pad: bool = True):
    g = torch.Generator().manual_seed(2 + batch)
    hist = torch.randint(1, N_ITEMS + 1, (batch, 10), generator=g)
    mask = torch.ones(batch, 10, dtype=torch.bool)
    if pad:
        mask[0, :6] = False  # a short, left-padded history
    items = hist if model.item_emb is not None else None
    with torch.no_grad():
        enc = model.encode(codes[hist - 1], mask, history_items=items)
    return enc, hist


def assert_same(fast, slow) -> None:
    assert torch.equal(fast.items, slow.items)
    assert torch.equal(fast.codes, slow.codes)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-5, atol=1e-4)
    alive = fast.scores > float("-inf")
    torch.testing.assert_close(
        fast.item_scores[alive], slow.item_scores[alive], rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("kind", ["moe", "dense", "leaf", "tree"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_search_equals_the_reference_with_exclusions_and_a_cold_start_item(
    kind, trained, batch
):
    model, codes = build(kind, trained)
    trie = CompiledTrie(codes, torch.arange(1, N_ITEMS + 1), K)
    free = sorted(set(range(K**L)) - {int(a * K * K + b * K + c) for a, b, c in codes.tolist()})
    cold = [free[0] // (K * K), (free[0] // K) % K, free[0] % K]
    trie.add(cold, 500)  # no id embedding, no entry in the model's tables
    enc, hist = requests(model, codes, batch)
    exclude = [h.tolist() for h in hist]
    for width in (4, 16):  # 16 > K: fewer first-step candidates than beams
        fast = beam_search(model, enc, trie, width, exclude=exclude)
        slow = beam_search_reference(model, enc, trie, width, exclude=exclude)
        assert_same(fast, slow)
        for b in range(batch):
            assert not set(fast.items[b].flatten().tolist()) & set(exclude[b])


@pytest.mark.parametrize("kind", ["moe", "leaf"])
def test_shorter_sessions_and_beams_that_die_match_the_reference(kind):
    model, codes = build(kind, trained=True)
    enc, _ = requests(model, codes, 2)
    short = beam_search(
        model, enc, CompiledTrie(codes, torch.arange(1, N_ITEMS + 1), K), 8, None, 2
    )
    assert short.items.shape == (2, 8, 2) and short.codes.shape == (2, 8, 2 * L)
    assert_same(
        short,
        beam_search_reference(
            model, enc, CompiledTrie(codes, torch.arange(1, N_ITEMS + 1), K), 8, None, 2
        ),
    )
    # Four items, sessions of three, one excluded: the 3! orderings of the other three
    # are the only valid sessions; with more beams than partial paths none is pruned and
    # the other beams die (item -1, score -inf).
    small = CompiledTrie(codes[:4], torch.tensor([1, 2, 3, 4]), K)
    fast = beam_search(model, enc, small, 80, exclude=[[4], [4]])
    slow = beam_search_reference(model, enc, small, 80, exclude=[[4], [4]])
    assert_same(fast, slow)
    alive = fast.scores > float("-inf")
    assert alive.sum(1).tolist() == [6, 6] and alive[:, :6].all()
    assert (fast.items[:, 6:] == -1).all()
    assert {frozenset(r) for r in fast.items[:, :6].reshape(-1, 3).tolist()} == {
        frozenset({1, 2, 3})
    }


def test_the_moe_paths_of_a_batch_agree_on_both_sides_of_the_dense_gate_threshold():
    """Batch sizes whose tokens fall under and over DENSE_GATE_MAX take the dense-gate and
    the sort-and-split MoE (and, with this many rows, k and v computed straight into the
    cache and elementwise self-attention); both equal the reference search. No padding:
    cross-attention without a mask."""
    model, codes = build("moe", trained=True)
    trie = CompiledTrie(codes, torch.arange(1, N_ITEMS + 1), K)
    width = 16
    big = DENSE_GATE_MAX // (4 * width) + 1  # rows × experts over the threshold
    assert big * width >= max(SPLIT_QKV_ROWS, ELEMENTWISE_ATTN_ROWS)
    enc, hist = requests(model, codes, big, pad=False)
    exclude = [h.tolist() for h in hist]
    fast = beam_search(model, enc, trie, width, exclude=exclude)
    assert_same(fast, beam_search_reference(model, enc, trie, width, exclude=exclude))
    from models.beam_search import _search_fast

    for dense in (True, False):  # forced either way, the same beams
        forced = _search_fast(model, enc, trie, width, exclude, None, moe_dense=dense)
        assert_same(forced, fast)


def test_the_decode_weights_follow_an_in_place_weight_update():
    """The fast path caches its fused weights per model; an optimizer step (an in-place
    update) rebuilds them, so a search after it is the reference's again."""
    model, codes = build("moe", trained=False)
    trie = CompiledTrie(codes, torch.arange(1, N_ITEMS + 1), K)
    enc, _ = requests(model, codes, 2)
    before = beam_search(model, enc, trie, 8)
    with torch.no_grad():
        for layer in model.dec_layers:
            layer.self_attn.q.weight.mul_(3.0)
            layer.ffn.w_up.add_(0.2)
        model.head.weight.mul_(5.0)
    after = beam_search(model, enc, trie, 8)
    assert_same(after, beam_search_reference(model, enc, trie, 8))
    assert not torch.allclose(before.scores, after.scores)
