"""Direct preference optimisation for OneRec sessions (OneRec section 3.3.2, eq. 10).

A preference pair is two sessions generated for the same history by one model version:
``chosen`` (the highest reward among the sampled candidates) and ``rejected`` (the lowest).
With pi the policy being trained and pi_ref the version that generated the pair, the DPO
loss of a pair is

    -log sigmoid( beta * [log pi(chosen) - log pi_ref(chosen)]
                - beta * [log pi(rejected) - log pi_ref(rejected)] )

where log pi(session) is the sum of the log-probabilities of the session's SID tokens
given the history (teacher-forced, log-softmax over all K codes of each level: the same
quantity beam search reports as a session's score). ``NtpDpoObjective`` computes the
next-token loss of a batch and the DPO loss of a batch of pairs in one forward call, so
that DistributedDataParallel sees exactly one forward per backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.onerec import OneRec


def session_logprob(
    model: OneRec,
    history: Tensor,  # (B, H) item ids, left-padded with 0
    history_codes: Tensor,  # (B, H, L) their SID codes
    session_codes: Tensor,  # (B, M, L) codes of the session's items
    session_mask: Tensor,  # (B, M) bool: real items (sessions shorter than M are padded)
) -> Tensor:
    """(B,) log p(session | history) under ``model``: teacher-forced, summed over the
    tokens of the real items (padding positions come last and are left out)."""
    cfg = model.cfg
    b, m, L = session_codes.shape
    if m > cfg.session_len:
        raise ValueError(f"sessions of {m} items; the model generates {cfg.session_len}")
    if m < cfg.session_len:  # pad to the model's M: later positions never affect earlier ones
        pad = cfg.session_len - m
        session_codes = F.pad(session_codes, (0, 0, 0, pad))
        session_mask = F.pad(session_mask, (0, pad))
    enc = model.encode(history_codes, history > 0, history_items=history)
    tgt = model.target_tokens(session_codes)  # (B, M*L)
    start = torch.zeros(b, 1, dtype=tgt.dtype, device=tgt.device)
    logits = model.decode(enc, torch.cat([start, tgt[:, :-1]], dim=1))  # (B, M*L, K)
    logp = logits.float().log_softmax(dim=-1)
    labels = session_codes.reshape(b, -1)
    tok = logp.gather(-1, labels[..., None]).squeeze(-1)  # (B, M*L)
    keep = session_mask.repeat_interleave(L, dim=1)
    return (tok * keep).sum(dim=1)


def dpo_loss(
    policy_chosen: Tensor,  # (P,) log pi(chosen)
    policy_rejected: Tensor,
    ref_chosen: Tensor,  # (P,) log pi_ref(chosen), no gradient
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO loss over the pairs, plus the implicit rewards' accuracy and margin."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    stats = {
        "dpo_accuracy": (margin > 0).float().mean().detach(),
        "dpo_margin": margin.mean().detach(),
    }
    return loss, stats


class NtpDpoObjective(nn.Module):
    """Next-token loss on sessions plus ``dpo_weight`` times the DPO loss on pairs, in
    one forward (wrap this module, not the model, in DDP)."""

    def __init__(self, model: OneRec, beta: float = 0.1, dpo_weight: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        self.model, self.beta, self.dpo_weight = model, beta, dpo_weight

    def forward(
        self,
        ntp: dict[str, Tensor],  # keyword arguments of OneRec.forward
        pairs: dict[str, Tensor] | None = None,  # history, history_codes, chosen_codes,
        # chosen_mask, rejected_codes, rejected_mask, ref_chosen, ref_rejected
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, parts = self.model(**ntp)
        if pairs is not None and len(pairs["history"]):
            p = pairs
            n = len(p["history"])
            # Chosen and rejected share one encoder/decoder pass: stack them as 2P rows.
            # Without dropout, as the reference's log-probabilities were taken: a pair's
            # log-ratio then starts at 0 and its gradient is the preference's, not the
            # dropout masks' (with dropout on, make bench-ipa-offline found DPO costing
            # watch time whichever way the pairs pointed).
            was_training = self.model.training
            self.model.train(False)
            try:
                logp = session_logprob(
                    self.model,
                    p["history"].repeat(2, 1),
                    p["history_codes"].repeat(2, 1, 1),
                    torch.cat([p["chosen_codes"], p["rejected_codes"]]),
                    torch.cat([p["chosen_mask"], p["rejected_mask"]]),
                )
            finally:
                self.model.train(was_training)
            dpo, stats = dpo_loss(logp[:n], logp[n:], p["ref_chosen"], p["ref_rejected"], self.beta)
            loss = loss + self.dpo_weight * dpo
            parts = {**parts, "dpo": dpo.detach(), **stats}
        return loss, parts
