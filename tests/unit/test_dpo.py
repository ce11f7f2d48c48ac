"""DPO for OneRec sessions: the loss against hand-computed values, session log-probabilities
against beam search's scores, and training on pairs moving the policy the right way."""

from __future__ import annotations

import math

import torch

from models.beam_search import CompiledTrie, beam_search
from models.dpo import NtpDpoObjective, dpo_loss, session_logprob
from models.onerec import OneRec
from tests.unit.test_onerec import K, L, random_codes, tiny_config


def test_dpo_loss_matches_a_hand_computed_value():
    # Pair 1: policy gained 1.0 on chosen and lost 0.5 on rejected vs the reference;
    # pair 2: the other way round. beta = 0.5.
    pc, pr = torch.tensor([-2.0, -3.0]), torch.tensor([-4.5, -1.0])
    rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.5])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    m1 = 0.5 * (1.0 - (-0.5))  # 0.75
    m2 = 0.5 * (-1.0 - 0.5)  # -0.75
    want = -(math.log(1 / (1 + math.exp(-m1))) + math.log(1 / (1 + math.exp(-m2)))) / 2
    assert abs(float(loss) - want) < 1e-6
    assert float(stats["dpo_accuracy"]) == 0.5
    assert abs(float(stats["dpo_margin"])) < 1e-6
    # At the reference (policy == reference) the loss is log 2 whatever beta.
    same, _ = dpo_loss(rc, rr, rc, rr, beta=3.0)
    assert abs(float(same) - math.log(2)) < 1e-6


def _model_and_trie():
    torch.manual_seed(0)
    model = OneRec(tiny_config()).eval()
    codes = random_codes(120)
    table = torch.cat([torch.zeros(1, L, dtype=torch.long), codes])  # row 0: padding
    trie = CompiledTrie(codes, torch.arange(1, 121), K)
    return model, table, trie


def test_session_logprob_is_the_beam_score_of_the_session():
    model, table, trie = _model_and_trie()
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(1, 121, (3, 10), generator=g)
    hist[0, :4] = 0  # left padding
    with torch.no_grad():
        enc = model.encode(table[hist], hist > 0, history_items=hist)
        beams = beam_search(model, enc, trie, beam_width=4)
        items = beams.items[:, 1]  # the second-best session of each request
        lp = session_logprob(model, hist, table[hist], table[items], items > 0)
    torch.testing.assert_close(lp, beams.scores[:, 1], rtol=1e-4, atol=1e-4)
    # A shorter session counts only its own items: the first item alone is its item score.
    with torch.no_grad():
        first = session_logprob(model, hist, table[hist], table[items[:, :1]], items[:, :1] > 0)
    torch.testing.assert_close(first, beams.item_scores[:, 1, 0], rtol=1e-4, atol=1e-4)


def _pairs(ref: OneRec, table, hist, chosen, rejected, mask) -> dict:
    """``NtpDpoObjective``'s pair inputs, with ``ref``'s log-probabilities as the reference."""
    with torch.no_grad():
        ref_c = session_logprob(ref, hist, table[hist], table[chosen], mask)
        ref_r = session_logprob(ref, hist, table[hist], table[rejected], mask)
    return {
        "history": hist,
        "history_codes": table[hist],
        "chosen_codes": table[chosen],
        "chosen_mask": mask,
        "rejected_codes": table[rejected],
        "rejected_mask": mask,
        "ref_chosen": ref_c,
        "ref_rejected": ref_r,
    }


def test_training_on_pairs_raises_chosen_over_rejected():
    model, table, _ = _model_and_trie()
    ref = OneRec(model.cfg)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    g = torch.Generator().manual_seed(5)
    hist = torch.randint(1, 121, (16, 10), generator=g)
    chosen = torch.randint(1, 121, (16, 3), generator=g)
    rejected = torch.randint(1, 121, (16, 3), generator=g)
    mask = torch.ones(16, 3, dtype=torch.bool)
    pairs = _pairs(ref, table, hist, chosen, rejected, mask)
    ref_c, ref_r = pairs["ref_chosen"], pairs["ref_rejected"]
    ntp_hist = torch.randint(1, 121, (8, 10), generator=g)
    ntp_tgt = torch.randint(1, 121, (8, 3), generator=g)
    ntp = {
        "history": table[ntp_hist],
        "history_mask": ntp_hist > 0,
        "target": table[ntp_tgt],
        "target_mask": ntp_tgt > 0,
        "history_items": ntp_hist,
    }
    obj = NtpDpoObjective(model, beta=0.5, dpo_weight=1.0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, parts = obj(ntp, pairs)
        first = first if first is not None else float(parts["dpo"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(first - math.log(2)) < 1e-4  # starts at the reference
    model.eval()
    with torch.no_grad():
        pol_c = session_logprob(model, hist, table[hist], table[chosen], mask)
        pol_r = session_logprob(model, hist, table[hist], table[rejected], mask)
    margin = (pol_c - ref_c) - (pol_r - ref_r)
    assert float((margin > 0).float().mean()) >= 0.9
    # Without pairs the objective is the plain next-token loss.
    loss_ntp, parts_ntp = obj(ntp, None)
    assert "dpo" not in parts_ntp and torch.isfinite(loss_ntp)


def test_pairs_are_scored_without_dropout_and_the_training_mode_is_restored():
    """The policy's log-probabilities of the pairs are taken as the reference's were (no
    dropout): before any step the DPO loss is exactly log 2 even with dropout on, and
    its gradient still reaches the weights."""
    torch.manual_seed(0)
    model = OneRec(tiny_config(dropout=0.5))
    codes = random_codes(120)
    table = torch.cat([torch.zeros(1, L, dtype=torch.long), codes])
    g = torch.Generator().manual_seed(7)
    hist = torch.randint(1, 121, (6, 10), generator=g)
    chosen, rejected = (torch.randint(1, 121, (6, 3), generator=g) for _ in range(2))
    mask = torch.ones(6, 3, dtype=torch.bool)
    pairs = _pairs(model.eval(), table, hist, chosen, rejected, mask)
    ntp = {
        "history": table[hist],
        "history_mask": hist > 0,
        "target": table[chosen],
        "target_mask": mask,
        "history_items": hist,
    }
    model.train()
    obj = NtpDpoObjective(model, beta=0.1, dpo_weight=1.0)
    for _ in range(3):  # dropout draws new masks each call: the pairs' loss stays put
        loss, parts = obj(ntp, pairs)
        assert abs(float(parts["dpo"]) - math.log(2)) < 1e-5
        assert model.training  # back in training mode for the next-token loss
    grads = []
    for with_pairs in (None, pairs):  # the same dropout masks: only the pairs differ
        model.zero_grad()
        torch.manual_seed(1)
        obj(ntp, with_pairs)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.dec_layers.parameters()]))
    assert torch.isfinite(grads[1]).all() and (grads[1] - grads[0]).abs().max() > 1e-6
