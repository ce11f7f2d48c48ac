"""OneRec model, MoE, constrained beam search and checkpoints, on tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from models.beam_search import (
    CompiledTrie,
    beam_search,
    beam_search_reference,
    score_all_items,
    score_items,
    trie_widths,
)
from models.onerec import MoEFFN, OneRec, OneRecConfig
from pipelines.offline.train_onerec import TrainConfig, make_examples, train_onerec

K, L = 8, 3


def tiny_config(**kw) -> OneRecConfig:
    base = dict(
        levels=L,
        codebook_size=K,
        session_len=3,
        max_history=10,
        dim=32,
        heads=2,
        enc_layers=1,
        dec_layers=2,
        ffn_hidden=64,
        moe_experts=4,
        moe_top_k=2,
        dropout=0.0,
    )
    base.update(kw)
    return OneRecConfig(**base)


def random_codes(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(K**L, generator=g)[:n]
    return torch.stack([flat // (K * K), (flat // K) % K, flat % K], dim=1)  # (n, L)


@pytest.fixture(params=["code-head", "leaf-logits", "tree-logits"])
def setup(request):
    """A tiny model; with item-aware logits, item embeddings large enough to matter."""
    torch.manual_seed(0)
    codes = random_codes(120)
    if request.param != "code-head":
        flag = request.param.replace("-", "_")
        model = OneRec(tiny_config(item_vocab=121, **{flag: True})).eval()
        with torch.no_grad():
            model.item_emb.weight[1:].normal_(std=0.5)
        model.set_leaf_items(torch.cat([torch.zeros(1, L, dtype=torch.long), codes]))
    else:
        model = OneRec(tiny_config()).eval()
    trie = CompiledTrie(codes, torch.arange(1, 121), K)
    g = torch.Generator().manual_seed(2)
    hist_items = torch.randint(1, 121, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[0, :6] = False  # a short history, left-padded
    enc = model.encode(codes[hist_items - 1], mask)
    return model, codes, trie, enc, hist_items


# ------------------------------------------------------------------------------- MoE
def test_moe_sends_each_token_to_top_k_experts_and_matches_the_dense_reference():
    torch.manual_seed(0)
    moe = MoEFFN(tiny_config())  # training mode (dropout 0): dispatch plus stats
    x = torch.randn(5, 7, 32)
    fast = moe(x)
    counts = moe.last.counts
    ref = moe.forward_reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert counts.sum() == 5 * 7 * 2  # every token assigned to exactly k=2 experts
    gates, top_i, _ = moe._gates(x.reshape(-1, 32))
    torch.testing.assert_close(gates.sum(-1), torch.ones(35))
    assert (top_i[:, 0] != top_i[:, 1]).all()


@pytest.mark.parametrize("dense", [None, True, False])
def test_moe_inference_path_matches_the_reference_and_keeps_no_stats(dense):
    torch.manual_seed(0)
    moe = MoEFFN(tiny_config())
    x = torch.randn(5, 7, 32)
    moe(x)
    assert moe.last is not None and model_aux(moe) > 0
    moe.eval()
    with torch.no_grad():
        ref = moe.forward_reference(x)
        fast = moe.infer(x, dense=dense)
        via_forward = moe(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_forward, ref, rtol=1e-5, atol=1e-5)
    assert moe.last is None  # eval: no balance loss nor stats
    with torch.no_grad():  # packed experts follow a weight update
        moe.w_up.add_(0.1)
        torch.testing.assert_close(moe.infer(x, dense=True), moe.forward_reference(x))


def model_aux(moe: MoEFFN) -> float:
    return float(moe.last.aux_loss.detach())


def test_load_balancing_loss_penalises_a_router_that_favours_one_expert():
    torch.manual_seed(0)
    moe = MoEFFN(tiny_config())
    x = torch.randn(256, 32)
    x[:, 0] = 1.0  # a constant feature the router can latch onto
    with torch.no_grad():
        moe.router.weight.normal_(std=0.01)
    moe(x)
    balanced = float(moe.last.aux_loss.detach())
    with torch.no_grad():
        moe.router.weight[0, 0] = 10.0  # experts 0 and 1 win every token
        moe.router.weight[1, 0] = 8.0
    moe(x)
    assert moe.last.counts.tolist() == [256, 256, 0, 0]
    assert float(moe.last.aux_loss.detach()) > balanced + 0.5
    # The loss is differentiable in the router, so training can push towards balance.
    moe.zero_grad()
    moe(x)
    moe.last.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_expert_utilisation_is_reported_per_layer():
    torch.manual_seed(0)
    model = OneRec(tiny_config())
    hist = random_codes(10)[None].expand(2, -1, -1)
    model(
        hist, torch.ones(2, 10, dtype=torch.bool), random_codes(3, seed=5)[None].expand(2, -1, -1)
    )
    util = model.expert_utilisation()
    assert len(util) == 2 and all(len(u) == 4 for u in util)
    assert all(abs(sum(u) - 1.0) < 1e-6 for u in util)
    dense = OneRec(tiny_config(moe_experts=0))
    assert (
        dense.expert_utilisation() == []
        and dense.num_params()["active"] == dense.num_params()["total"]
    )
    assert model.num_params()["active"] < model.num_params()["total"]


# ------------------------------------------------------------------------------- training
def test_make_examples_cuts_sessions_and_pads():
    ex = make_examples([[1, 2, 3, 4, 5, 6, 7]], max_history=4, session_len=3, stride=3)
    assert ex.histories().tolist() == [[0, 0, 0, 1], [1, 2, 3, 4]]
    assert ex.target.tolist() == [[2, 3, 4], [5, 6, 7]]
    ex = make_examples([[1, 2, 3]], max_history=2, session_len=3, stride=1)
    assert ex.target.tolist() == [[2, 3, 0], [3, 0, 0]]


def test_long_sequences_get_windows_with_at_least_half_the_history():
    seq = list(range(1, 31))
    ex = make_examples([seq], max_history=6, session_len=2, stride=1)
    assert len(ex) == 29 and len(ex.windows) < 29
    for hist, tgt in zip(ex.histories().tolist(), ex.target.tolist(), strict=True):
        p = tgt[0] - 1  # index of the first target item
        items = [i for i in hist if i]
        assert items == seq[p - len(items) : p]  # the items right before the session
        assert len(items) >= min(p, 3)
        assert tgt == (seq[p : p + 2] + [0, 0])[:2]


def test_prefix_shared_loss_equals_encoding_each_history_alone():
    """The causal encoder lets one window serve all of its prefixes; the loss must be the
    one obtained by encoding every example's history on its own."""
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=31)).eval()
    codes = torch.zeros(31, L, dtype=torch.long)
    codes[1:] = random_codes(30)
    seqs = [[(3 * s + 7 * j) % 30 + 1 for j in range(n)] for s, n in enumerate([14, 3, 9])]
    ex = make_examples(seqs, max_history=6, session_len=3, stride=1)
    h, end, t, ctx = next(ex.batches(10_000, torch.Generator().manual_seed(0)))
    assert ctx is None
    _, shared = model(codes[h], h > 0, codes[t], t > 0, history_items=h, prefix_end=end)
    alone_h = ex.histories()
    # the mean over the same sessions, whatever their order and padding
    _, alone = model(
        codes[alone_h], alone_h > 0, codes[ex.target], ex.target > 0, history_items=alone_h
    )
    assert torch.allclose(shared["ntp"], alone["ntp"], atol=1e-5)


def test_target_weights_scale_each_items_share_of_the_next_token_loss():
    """Reward-weighted likelihood: weights of one are the plain loss; an item of weight
    zero gives no gradient (as if it were masked); the reported ntp stays unweighted."""
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=31, next_item_weight=0.5)).eval()
    codes = torch.zeros(31, L, dtype=torch.long)
    codes[1:] = random_codes(30)
    g = torch.Generator().manual_seed(3)
    h = torch.randint(1, 31, (4, 10), generator=g)
    t = torch.randint(1, 31, (4, 3), generator=g)
    t[1, 2] = 0  # a short session
    args = (codes[h], h > 0, codes[t], t > 0)
    kw = dict(history_items=h, target_items=t)
    plain, parts = model(*args, **kw)
    ones, ones_parts = model(*args, target_weight=torch.ones(4, 3), **kw)
    torch.testing.assert_close(ones, plain)
    twice, twice_parts = model(*args, target_weight=torch.full((4, 3), 2.0), **kw)
    aux = model.cfg.moe_aux_weight * parts["moe_aux"]
    torch.testing.assert_close(twice - aux, 2 * (plain - aux))
    torch.testing.assert_close(twice_parts["ntp"], parts["ntp"])  # reported unweighted
    # weight zero on the first session's items == those items masked, up to the count
    # (the code-token loss alone: no next-item head, no balance loss to rescale)
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=31, moe_aux_weight=0.0)).eval()
    w = torch.ones(4, 3)
    w[0] = 0.0
    model.zero_grad()
    model(*args, target_weight=w, **kw)[0].backward()
    weighted = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    keep = t > 0
    keep[0] = False
    model.zero_grad()
    masked = OneRec.forward(model, codes[h], h > 0, codes[t], keep, history_items=h,
                            target_items=t.masked_fill(~keep, 0))[0]  # fmt: skip
    ratio = float(keep.sum()) / float((t > 0).sum())  # the weighted loss divides by all kept
    (masked * ratio).backward()
    masked_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(weighted) == len(masked_grads)
    for a, b in zip(weighted, masked_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_training_loss_decreases_on_a_tiny_planted_dataset():
    codes = torch.zeros(31, L, dtype=torch.long)
    codes[1:] = random_codes(30)
    # Deterministic cycles: after item i comes item i + 1.
    seqs = [[(s + j) % 30 + 1 for j in range(12)] for s in range(30)]
    cfg = TrainConfig(
        model=tiny_config(),
        epochs=25,
        batch_size=32,
        lr=3e-3,
        warmup_steps=5,
        stride=1,
        patience=100,
    )
    model, history = train_onerec(seqs, codes, cfg, log=lambda _: None)
    first, last = history[0]["ntp_loss"], history[-1]["ntp_loss"]
    assert last < 0.5 * first, (first, last)


# ------------------------------------------------------------------------------- search
def test_cached_beam_search_returns_the_same_beams_and_scores_as_the_reference(setup):
    model, _, trie, enc, hist = setup
    exclude = hist.tolist()
    fast = beam_search(model, enc, trie, beam_width=16, exclude=exclude)
    slow = beam_search_reference(model, enc, trie, beam_width=16, exclude=exclude)
    assert torch.equal(fast.items, slow.items)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-5, atol=1e-4)
    assert (fast.scores[:, :-1] >= fast.scores[:, 1:]).all()  # best first


def test_every_emitted_sid_is_a_real_item_never_repeated_nor_excluded(setup):
    model, codes, trie, enc, hist = setup
    beams = beam_search(model, enc, trie, beam_width=32, exclude=hist.tolist())
    sid_to_item = {tuple(c): i + 1 for i, c in enumerate(codes.tolist())}
    for b in range(4):
        for w in range(32):
            items = beams.items[b, w].tolist()
            assert len(set(items)) == len(items)
            assert not set(items) & set(hist[b].tolist())
            sids = beams.codes[b, w].view(-1, L).tolist()
            assert [sid_to_item[tuple(s)] for s in sids] == items


def test_a_beam_score_is_the_teacher_forced_log_probability_of_its_session(setup):
    model, _, trie, enc, _ = setup
    beams = beam_search(model, enc, trie, beam_width=4)
    session = beams.codes[:, 0]  # (B, M*L) best session per request
    tokens = model.target_tokens(session.view(4, -1, L))
    start = torch.zeros(4, 1, dtype=torch.long)
    logp = model.decode(enc, torch.cat([start, tokens[:, :-1]], 1)).log_softmax(-1)
    per_token = logp.gather(-1, session[..., None]).squeeze(-1)  # (B, M*L)
    torch.testing.assert_close(per_token.sum(-1), beams.scores[:, 0], rtol=1e-4, atol=1e-4)
    # Per-item scores split the session's log p by item (what serving returns).
    per_item = per_token.view(4, -1, L).sum(-1)
    torch.testing.assert_close(per_item, beams.item_scores[:, 0], rtol=1e-4, atol=1e-4)


def test_grouped_item_scoring_matches_one_sequence_per_row(setup):
    model, codes, _, enc, _ = setup
    grouped = score_items(model, enc, codes[None].expand(4, -1, -1))
    for b in range(4):
        rows = enc.index_select(torch.full((len(codes),), b))
        toks = torch.cat(
            [
                torch.zeros(len(codes), 1, dtype=torch.long),
                (codes + torch.arange(L) * K + 1)[:, :-1],
            ],
            1,
        )
        lp = model.decode(rows, toks).log_softmax(-1).gather(-1, codes[..., None])
        torch.testing.assert_close(grouped[b], lp.squeeze(-1).sum(-1), rtol=1e-4, atol=1e-4)


def test_trie_walk_scores_every_item_like_teacher_forcing(setup):
    model, codes, trie, enc, _ = setup
    walk = score_all_items(model, enc, trie)  # (B, 121)
    forced = score_items(model, enc, codes[None].expand(4, -1, -1))
    assert torch.isinf(walk[:, 0]).all()
    torch.testing.assert_close(walk[:, 1:], forced, rtol=1e-4, atol=1e-4)


def test_trie_walk_in_groups_of_requests_scores_as_in_one(setup):
    """A large catalogue's walk goes a few requests at a time (bounded rows per level):
    the grouping changes no score."""
    model, _, trie, enc, _ = setup
    widths = trie_widths(trie)
    assert widths[0] == 1 and len(widths) == trie.levels and widths == sorted(widths)
    whole = score_all_items(model, enc, trie)
    for rows in (1, max(widths), 3 * max(widths)):  # groups of 1, 1 and 3 requests
        torch.testing.assert_close(
            score_all_items(model, enc, trie, max_rows=rows), whole, rtol=1e-5, atol=1e-5
        )


def test_cold_start_item_inserted_in_the_trie_is_decodable_at_once(setup):
    model, codes, _, enc, _ = setup
    # A catalogue of exactly M items: every session is a permutation of them.
    small = CompiledTrie(codes[:3], torch.tensor([1, 2, 3]), K)
    before = beam_search(model, enc, small, beam_width=8)
    assert {frozenset(r) for r in before.items.view(-1, 3).tolist() if -1 not in r} == {
        frozenset({1, 2, 3})
    }
    small.add(codes[50].tolist(), 99)
    after = beam_search(model, enc, small, beam_width=32)
    assert (after.items == 99).any()
    with pytest.raises(ValueError, match="already belongs"):
        small.add(codes[50].tolist(), 100)


def test_trie_refuses_codes_outside_the_codebook():
    with pytest.raises(ValueError, match="outside"):
        CompiledTrie(torch.tensor([[0, 0, K]]), torch.tensor([1]), K)


# ------------------------------------------------------------------------------- checkpoints
def _tokenizer(n: int = 60):
    from models.tokenizer import SemanticIdTokenizer, TokenizerConfig

    torch.manual_seed(0)
    return SemanticIdTokenizer.fit(
        torch.randn(n, 8), list(range(1, n + 1)), TokenizerConfig(levels=L, codebook_size=K, seed=0)
    )


def test_checkpoint_round_trip_reproduces_the_model_and_tokenizer(tmp_path, setup):
    from recloop.checkpoint import load_checkpoint, save_checkpoint

    model, codes, _, enc, _ = setup
    tok = _tokenizer()
    path = save_checkpoint(tmp_path / "v1", model, tok, {"version": "v1"})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temp dir left behind
    ck = load_checkpoint(path)
    assert (
        ck.meta["version"] == "v1"
        and ck.tokenizer.codes([1, 2]).tolist() == tok.codes([1, 2]).tolist()
    )
    c = codes[None, :10].expand(4, -1, -1)
    torch.testing.assert_close(
        score_items(
            ck.model,
            ck.model.encode(
                torch.zeros(4, 10, L, dtype=torch.long), torch.ones(4, 10, dtype=torch.bool)
            ),
            c,
        ),
        score_items(
            model,
            model.encode(
                torch.zeros(4, 10, L, dtype=torch.long), torch.ones(4, 10, dtype=torch.bool)
            ),
            c,
        ),
    )
    with pytest.raises(FileExistsError):
        save_checkpoint(path, model, tok)


def test_bad_checkpoints_are_refused_with_a_reason(tmp_path, setup):
    from safetensors.torch import load_file, save_file

    from recloop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    model, *_ = setup
    tok = _tokenizer()
    nan = save_checkpoint(tmp_path / "nan", model, tok)
    weights = load_file(str(nan / "model.safetensors"))
    weights["head.weight"][0, 0] = float("nan")
    save_file(weights, str(nan / "model.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(nan)

    corrupt = save_checkpoint(tmp_path / "corrupt", model, tok)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt|unreadable"):
        load_checkpoint(corrupt)

    mismatch = save_checkpoint(tmp_path / "mismatch", model, tok)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(mismatch)

    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_onerec_runs_through_the_evaluation_harness_and_its_scores_rank_items(tmp_path):
    from pipelines.offline.evaluate import run_eval

    out = tmp_path / "onerec.json"
    result = run_eval(
        "onerec",
        "synthetic",
        seed=0,
        epochs=1,
        out_json=out,
        log=None,
        options={
            "dim": 32,
            "heads": 2,
            "enc_layers": 1,
            "dec_layers": 1,
            "ffn_hidden": 64,
            "codebook_size": 8,
            "val_users": 20,
            "batch_size": 64,
        },
    )
    saved = json.loads(out.read_text())
    assert saved["model"] == "onerec"
    full = saved["metrics"]["full"]
    assert 0.0 <= full["NDCG@10"] <= full["HR@10"] <= 1.0
    assert result["metrics"]["full"] == full  # the JSON is what run_eval returned


def test_pretrain_job_writes_a_loadable_versioned_checkpoint(tmp_path, capsys):
    from pipelines.offline.pretrain import main
    from recloop.checkpoint import load_checkpoint

    out = tmp_path / "seed-v1"
    assert (
        main(["--data", "synthetic", "--quick", "--dim", "32", "--threads", "1", "--out", str(out)])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out)
    ck = load_checkpoint(out)
    assert ck.meta["version"] == "seed-v1" and ck.tokenizer.num_items == 300
    assert ck.meta["metrics"]["test_full"]["users"] == 200
    assert len(ck.meta["history"]) == 2  # --quick: two epochs


def test_item_id_embeddings_tell_items_apart_and_unknown_ids_fall_back_to_codes():
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=11)).eval()
    codes = random_codes(3)[None]  # (1, 3, L)
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain = model.encode(codes, mask).memory
    with_ids = model.encode(codes, mask, history_items=torch.tensor([[1, 2, 3]])).memory
    assert not torch.allclose(plain, with_ids)
    # Ids the model never saw (>= item_vocab, e.g. cold-start items) use their codes only.
    unseen = model.encode(codes, mask, history_items=torch.tensor([[50, 60, 70]])).memory
    torch.testing.assert_close(
        unseen, model.encode(codes, mask, history_items=torch.zeros(1, 3, dtype=torch.long)).memory
    )


def _leaf_model(codes: torch.Tensor, vocab: int) -> OneRec:
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=vocab, leaf_logits=True)).eval()
    with torch.no_grad():
        model.item_emb.weight[1:].normal_(std=0.5)
    model.set_leaf_items(torch.cat([torch.zeros(1, L, dtype=torch.long), codes]))
    return model


def test_leaf_logits_give_the_items_under_the_prefix_their_own_last_level_logit():
    codes = random_codes(40)
    model = _leaf_model(codes, vocab=31)  # items 31..40 have no id embedding (cold start)
    # The table holds exactly the known items, under their own SIDs.
    for item in (1, 17, 30):
        assert int(model.leaf_items(codes[item - 1, :-1])[codes[item - 1, -1]]) == item
    for item in (31, 40):
        assert int(model.leaf_items(codes[item - 1, :-1])[codes[item - 1, -1]]) == 0
    plain = OneRec(tiny_config(item_vocab=31)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "leaf_table"})
    enc = model.encode(codes[None, :5], torch.ones(1, 5, dtype=torch.bool))
    session = codes[None, 5:8]  # (1, M, L): items 6, 7, 8
    tokens = torch.cat([torch.zeros(1, 1, dtype=torch.long), model.target_tokens(session)], 1)
    diff = model.decode(enc, tokens[:, :-1]) - plain.decode(enc, tokens[:, :-1])  # (1, 9, K)
    last = torch.arange(9) % L == L - 1
    assert diff[0, ~last].abs().max() == 0  # levels before the last are untouched
    for m, j in enumerate(torch.nonzero(last).flatten().tolist()):
        under = model.leaf_items(session[0, m, :-1])  # (K,) items sharing the prefix
        assert diff[0, j, under == 0].abs().max() == 0  # no item there: code logit alone
        assert diff[0, j, under > 0].abs().min() > 0
        # Moving one item's embedding moves only that item's logit. The step is not a
        # constant vector: the decoder's output is layer-normed (its entries sum to 0), so
        # h . (1, ..., 1) is rounding noise.
        code = int(session[0, m, -1])
        step = torch.randn(model.cfg.dim, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            model.item_emb.weight[int(under[code])] += step
        moved = model.decode(enc, tokens[:, :-1]) - plain.decode(enc, tokens[:, :-1]) - diff
        assert moved[0, j, code].abs() > 1e-3
        moved[0, j, code] = 0
        assert moved.abs().max() < 1e-5
        with torch.no_grad():
            model.item_emb.weight[int(under[code])] -= step


def test_leaf_logits_need_the_prefix_on_an_incremental_step():
    codes = random_codes(20)
    model = _leaf_model(codes, vocab=21)
    enc = model.encode(codes[None, :5], torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass past="):
        model.decode(enc, torch.tensor([[3]]), start_pos=L - 1, caches=[{} for _ in range(2)])
    with pytest.raises(ValueError, match="item_vocab"):
        OneRec(tiny_config(leaf_logits=True))


def test_tree_logits_add_the_log_sum_exp_of_the_subtrees_item_scores():
    codes = random_codes(40)
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=31, tree_logits=True)).eval()
    with torch.no_grad():
        model.item_emb.weight[1:].normal_(std=0.5)
    model.set_leaf_items(torch.cat([torch.zeros(1, L, dtype=torch.long), codes]))
    plain = OneRec(tiny_config(item_vocab=31)).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k not in ("leaf_table", "item_nodes")}
    )
    seen = {}
    model.dec_ln.register_forward_hook(lambda m, i, o: seen.update(h=o))
    enc = model.encode(codes[None, :5], torch.ones(1, 5, dtype=torch.bool))
    session = codes[None, 5:8]
    tokens = torch.cat([torch.zeros(1, 1, dtype=torch.long), model.target_tokens(session)], 1)
    diff = model.decode(enc, tokens[:, :-1]) - plain.decode(enc, tokens[:, :-1])  # (1, 9, K)
    h, known = seen["h"][0], codes[:30]  # items 1..30 have embeddings; 31..40 are cold
    scores = h @ model.item_emb.weight[1:31].T  # (9, 30)
    for j in range(9):
        m, level = j // L, j % L
        prefix = session[0, m, :level]
        for c in range(K):
            under = (known[:, :level] == prefix).all(1) & (known[:, level] == c)
            want = torch.logsumexp(scores[j, under], 0) if under.any() else torch.tensor(0.0)
            torch.testing.assert_close(diff[0, j, c], want, rtol=1e-4, atol=1e-4)
