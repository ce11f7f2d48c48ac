"""OnePiece's joint objective and cascade: InfoNCE and BCE against hand-computed values,
cascade re-ranking inside the catalogue and the exclusions, the ranker's scorings, and the
training hygiene (embedding clip and learning rates, MoE load Gini)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.beam_search import CompiledTrie, beam_search
from models.cascade import blend, rerank_beams, rerank_scores
from models.onerec import OneRec
from pipelines.offline.train_onerec import (
    OneRecRanker,
    TrainConfig,
    _param_groups,
    gini,
    train_onerec,
)
from tests.unit.test_onerec import K, L, random_codes, tiny_config

N = 40


def head_model(**kw) -> tuple[OneRec, torch.Tensor]:
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=N + 1, infonce_weight=1.0, **kw)).eval()
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    model.set_leaf_items(codes)
    return model, codes


def test_infonce_and_bce_match_hand_computed_values():
    model, _ = head_model(infonce_negatives=0)  # in-batch negatives only: deterministic
    user = torch.randn(3, model.cfg.dim)
    positive = torch.tensor([5, 9, 5])  # rows 0 and 2 share their positive
    nce, bce = model.contrastive_losses(user, positive)
    vec = model.item_vectors(positive)
    s = (user @ vec.T).tolist()  # temperature 1
    # Row 0: its own slot 0 is the positive; slot 2 is item 5 again, masked. Row 2 alike.
    rows = [
        (s[0][0], [s[0][0], s[0][1]]),
        (s[1][1], [s[1][0], s[1][1], s[1][2]]),
        (s[2][2], [s[2][1], s[2][2]]),
    ]
    want_nce = sum(-(p - math.log(sum(math.exp(x) for x in xs))) for p, xs in rows) / 3

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    negatives = [s[0][1], s[1][0], s[1][2], s[2][1]]
    want_bce = sum(softplus(-s[i][i]) for i in range(3)) / 3
    want_bce += sum(softplus(x) for x in negatives) / len(negatives)
    assert nce.item() == pytest.approx(want_nce, rel=1e-5)
    assert bce.item() == pytest.approx(want_bce, rel=1e-5)


def test_temperature_divides_the_logits():
    model, _ = head_model(infonce_negatives=0, infonce_temperature=0.5)
    user, positive = torch.randn(2, model.cfg.dim), torch.tensor([3, 4])
    s = user @ model.item_vectors(positive).T / 0.5
    assert model.contrastive_losses(user, positive)[0].item() == pytest.approx(
        F.cross_entropy(s, torch.arange(2)).item(), rel=1e-5
    )


def test_item_vectors_of_a_cold_item_come_from_its_codes():
    model, codes = head_model()
    cold = torch.tensor([N + 5])  # beyond item_vocab: no id embedding
    sid = codes[3:4]
    offsets = torch.arange(L) * K
    want = model.code_emb(sid + offsets).sum(dim=-2)
    assert torch.allclose(model.item_vectors(cold, sid), want)


def test_the_head_trains_and_its_terms_are_reported():
    model, codes = head_model(bce_weight=0.5)
    seqs = [torch.randint(1, N + 1, (12,)).tolist() for _ in range(20)]
    cfg = TrainConfig(model=model.cfg, epochs=2, batch_size=32, warmup_steps=1)
    model, history = train_onerec(seqs, codes, cfg, init=model, log=lambda m: None)
    assert history[0]["infonce_loss"] > 0 and history[0]["bce_loss"] > 0
    assert history[-1]["infonce_loss"] < history[0]["infonce_loss"]


def test_no_head_no_contrastive_scoring():
    model = OneRec(tiny_config(item_vocab=N + 1)).eval()
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    with pytest.raises(ValueError, match="contrastive head"):
        OneRecRanker(model, codes, scoring="cascade")
    with pytest.raises(ValueError, match="item_vocab"):
        OneRec(tiny_config(infonce_weight=1.0))


def test_blend_is_sid_plus_weighted_log_softmax_over_the_candidates():
    sid = torch.tensor([[-1.0, -2.0, -3.0]])
    head = torch.tensor([[0.0, 2.0, 5.0]])
    valid = torch.tensor([[True, True, False]])
    out = blend(sid, head, valid, 0.5)
    log_p = torch.tensor([0.0, 2.0]).log_softmax(0)
    assert out[0, :2].tolist() == pytest.approx((sid[0, :2] + 0.5 * log_p).tolist())
    assert out[0, 2] == float("-inf")


def test_rerank_beams_stays_in_the_catalogue_and_keeps_the_exclusions():
    model, codes = head_model()
    trie = CompiledTrie(codes[1:], torch.arange(1, N + 1), K)
    hist = torch.randint(1, N + 1, (4, 6))
    enc = model.encode(codes[hist], hist > 0, history_items=hist)
    exclude = hist.tolist()
    beams = beam_search(model, enc, trie, beam_width=8, exclude=exclude)
    for weight in (0.0, 1.0, 50.0):
        out = rerank_beams(model, enc, beams, codes, weight=weight)
        m = model.cfg.session_len
        assert out.items.shape == (4, m)
        for b in range(4):
            got = out.items[b].tolist()
            assert all(1 <= i <= N for i in got)  # real items only
            assert len(set(got)) == m  # no item twice in a session
            assert not set(got) & set(exclude[b])  # history excluded
            assert set(got) <= set(beams.items[b].flatten().tolist())  # proposed by the beams
        scores = out.scores
        assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    # Weight 0 orders by the beam's item scores alone.
    zero = rerank_beams(model, enc, beams, codes, weight=0.0)
    assert torch.all(zero.sid_scores[:, :-1] >= zero.sid_scores[:, 1:])


def test_a_large_weight_orders_by_the_head():
    model, codes = head_model()
    trie = CompiledTrie(codes[1:], torch.arange(1, N + 1), K)
    hist = torch.randint(1, N + 1, (3, 6))
    enc = model.encode(codes[hist], hist > 0, history_items=hist)
    beams = beam_search(model, enc, trie, beam_width=8)
    out = rerank_beams(model, enc, beams, codes, weight=1e6)
    assert torch.all(out.contrastive[:, :-1] >= out.contrastive[:, 1:])


def test_rerank_scores_puts_the_proposals_first_in_blend_order():
    sid = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0]])
    head = torch.tensor([[0.0, 0.0, 9.0, 0.0, 99.0]])
    eligible = torch.tensor([[False, True, True, True, True]])  # item 0 is in the history
    out = rerank_scores(sid, head, eligible, proposals=2, weight=1.0)
    order = out[0].argsort(descending=True).tolist()
    # Proposals: the 2 best eligible by SID (1 and 2); 2 wins on the head. Then the rest
    # by SID: 0 (the caller masks it), 3, 4 — item 4's huge head score does not lift it.
    assert order == [2, 1, 0, 3, 4]


@pytest.mark.parametrize("scoring", ["sid", "infonce", "cascade"])
def test_ranker_scorings_cover_the_catalogue(scoring):
    model, codes = head_model()
    ranker = OneRecRanker(model, codes, scoring=scoring, cascade_candidates=5)
    hist = [[1, 2, 3], [4, 5]]
    full = ranker.score(hist, None)
    assert full.shape == (2, N + 1) and full[:, 0].eq(float("-inf")).all()
    assert torch.isfinite(full[:, 1:]).all()
    cand = torch.tensor([[7, 8, 9, 1], [10, 11, 12, 4]])
    part = ranker.score(hist, cand)
    assert part.shape == (2, 4)
    if scoring == "infonce":
        want = model.contrastive_scores(ranker.encode(hist), cand, codes[cand])
        assert torch.allclose(part, want)
        assert torch.allclose(full.gather(1, cand), want, atol=1e-5)
    if scoring == "cascade":
        # The 5 proposals exclude the history and lead the ranking.
        for b, h in enumerate(hist):
            top = full[b].argsort(descending=True)[:5].tolist()
            assert not set(top) & set(h)
            sid = ranker.with_scoring("sid").score([h], None)[0]
            sid[h] = float("-inf")
            assert set(top) == set(sid.topk(5).indices.tolist())


def test_item_and_hybrid_scorings_read_the_next_item_head():
    model, codes = head_model(next_item_weight=1.0)
    sid = OneRecRanker(model, codes)
    hist = [[1, 2, 3], [4, 5]]
    enc = sid.encode(hist)
    logits = model.next_item_logits(enc).clone()
    logits[:, 0] = float("-inf")
    want_item = torch.log_softmax(logits, dim=-1)
    item = sid.with_scoring("item").score(hist, None)
    assert torch.allclose(item, want_item) and torch.exp(item).sum(1).allclose(torch.ones(2))
    hybrid = sid.with_scoring("hybrid", hybrid_weight=0.5)
    assert torch.allclose(hybrid.score(hist, None), sid.score(hist, None) + 0.5 * want_item)
    cand = torch.tensor([[7, 8, 9, 1], [10, 11, 12, 4]])
    assert torch.allclose(hybrid.score(hist, cand), hybrid.score(hist, None).gather(1, cand))
    assert torch.equal(  # weight 0: the SID ranking
        sid.with_scoring("hybrid", hybrid_weight=0.0).score(hist, None), sid.score(hist, None)
    )
    plain, codes = head_model()  # no next-item loss: its head is untrained, refused
    with pytest.raises(ValueError, match="next-item head"):
        OneRecRanker(plain, codes, scoring="hybrid")


def test_gini_of_expert_loads():
    assert gini([0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.0)
    assert gini([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.75)
    # Hand-computed: sorted (0.1, 0.2, 0.3, 0.4), 2*sum(i*x)/(n*sum) - (n+1)/n
    assert gini([0.4, 0.1, 0.3, 0.2]) == pytest.approx(2 * 3.0 / 4 - 5 / 4)


def test_embedding_clip_and_learning_rates():
    model, codes = head_model()
    cfg = TrainConfig(model=model.cfg, lr=1e-2, embedding_lr=1e-1, embedding_clip=0.05)
    groups = {g["name"]: g for g in _param_groups(model, cfg)}
    assert groups["embedding"]["lr"] == 0.1 and groups["dense"]["lr"] == 0.01
    emb = {id(p) for p in groups["embedding"]["params"]}
    assert id(model.item_emb.weight) in emb and id(model.code_emb.weight) in emb
    assert id(model.user_head.weight) not in emb
    seqs = [torch.randint(1, N + 1, (12,)).tolist() for _ in range(10)]
    cfg.epochs, cfg.warmup_steps = 1, 1
    model, history = train_onerec(seqs, codes, cfg, init=model, log=lambda m: None)
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            assert m.weight.abs().max() <= 0.05 + 1e-6
    assert len(history[0]["expert_load_gini"]) == len(model.moe_layers())
    assert all(0.0 <= g < 1.0 for g in history[0]["expert_load_gini"])


def test_latent_steps_zero_is_the_model_without_them():
    torch.manual_seed(3)
    plain = OneRec(tiny_config(item_vocab=N + 1)).eval()
    torch.manual_seed(3)
    zero = OneRec(tiny_config(item_vocab=N + 1, latent_steps=0)).eval()
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    hist = torch.randint(1, N + 1, (3, 7))
    a = plain.encode(codes[hist], hist > 0, history_items=hist)
    b = zero.encode(codes[hist], hist > 0, history_items=hist)
    assert b.layer_kv is None
    assert torch.equal(a.summary, b.summary) and torch.equal(a.memory, b.memory)
    tokens = torch.zeros(3, 1, dtype=torch.long)
    assert torch.equal(plain.decode(a, tokens), zero.decode(b, tokens))


@pytest.mark.parametrize("steps", [1, 2])
def test_latent_steps_change_the_summary_and_keep_the_prefix_trick(steps):
    torch.manual_seed(3)
    model = OneRec(tiny_config(item_vocab=N + 1, latent_steps=steps)).eval()
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    window = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12]])  # max_history 10, left-padded
    enc = model.encode(codes[window], window > 0, history_items=window)
    latest = enc.memory[:, -1]
    assert not torch.allclose(enc.summary, latest)  # the steps did something
    # A prefix of the window (up to encoder position 6 = item 8) reasons to the same state
    # as that prefix encoded on its own.
    alone = torch.tensor([[0, 0, 0, 0, 0, 0, 5, 6, 7, 8]])
    ref = model.encode(codes[alone], alone > 0, history_items=alone).summary
    pos = torch.arange(enc.memory.shape[1])
    visible = (pos[None, None, :] <= torch.tensor([[6]])[:, :, None]) & enc.mask[:, 0]
    got = model.reason(enc.prefixes(torch.tensor([[6]]), 1), visible)[:, 0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_latent_steps_train():
    torch.manual_seed(0)
    model = OneRec(tiny_config(item_vocab=N + 1, latent_steps=2, next_item_weight=1.0))
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    seqs = [torch.randint(1, N + 1, (12,)).tolist() for _ in range(20)]
    cfg = TrainConfig(model=model.cfg, epochs=3, batch_size=32, warmup_steps=1)
    before = model.latent_pos.weight.detach().clone()
    model, history = train_onerec(seqs, codes, cfg, init=model, log=lambda m: None)
    assert history[-1]["ntp_loss"] < history[0]["ntp_loss"]
    assert not torch.allclose(model.latent_pos.weight, before)  # the steps get gradients


def test_power_law_fit_recovers_its_exponent():
    from pipelines.offline.scaling import fit_power_law

    x = [1e3, 3e3, 1e4, 3e4, 1e5]
    fit = fit_power_law(x, [5.0 * v**-0.2 for v in x])
    assert fit["alpha"] == pytest.approx(0.2) and fit["A"] == pytest.approx(5.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = fit_power_law(x, [5.0 * v**-0.2 * (1.05 if i % 2 else 0.95) for i, v in enumerate(x)])
    assert 0.5 < noisy["r2"] < 1.0
    with pytest.raises(ValueError, match="two distinct"):
        fit_power_law([10, 10], [1, 2])


def test_scaling_study_runs_end_to_end_on_generated_data(tmp_path):
    import json

    from pipelines.offline.scaling import main

    out = tmp_path / "scaling.json"
    argv = ["--data", "synthetic", "--dims", "8,16", "--fractions", "0.5,1", "--epochs", "1"]
    assert main([*argv, "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["kind"] for r in result["runs"]] == ["size", "size", "data"]
    assert all(r["sid_loss"] > 0 and r["infonce_loss"] > 0 for r in result["runs"])
    assert set(result["fits"]["params"]) == {"sid_loss", "infonce_loss"}
    assert out.with_suffix(".png").stat().st_size > 0
