"""The promotion gate: may a continuously trained candidate replace the version serving?

``gate(candidate_dir, base_dir, holdout, tolerance)`` runs three checks, in order, and
stops at the first that fails:

a. **loads, finite weights**: ``load_checkpoint`` refuses non-finite weights and any
   shape or key mismatch (``CheckpointError``); such a candidate is never promoted.
b. **offline metric on the held-out slice**: the round's newest sessions, never trained
   on. The gated metric is the *pair AUC*: within each held-out session, how often the
   model scores a clicked item above a served item the user skipped (first-item log
   probability given the history; ties count half), averaged over sessions with both.
   Unlike a ranking over the whole catalogue, it does not favour the model that served
   the session: every item compared was shown. NDCG@k and recall@k of the engaged items
   over the whole catalogue are reported beside it, and gated instead when the slice
   holds no skipped items (a slice without ``served``). For NDCG the model ranks the
   whole catalogue given the user's history (``OneRecRanker.score``: log p(item is the
   first item of the next session)); history items are excluded from the ranking unless
   they are also engaged items, and ties are broken pessimistically (rank = 1 + the items
   scoring >= the item), as in ``pipelines.offline.evaluation``. The relevant items are the
   session's engaged (clicked) items; per session

       NDCG@k   = sum_{engaged t, rank_t <= k} 1/log2(1 + rank_t) / IDCG(min(|T|, k))
       recall@k = |{engaged t: rank_t <= k}| / |T|

   averaged over the sessions. On the gated metric the candidate is rejected when
   ``candidate < base * (1 - tolerance)`` (a relative regression of more than
   ``tolerance``) *and* the drop exceeds ``NOISE_Z`` standard errors of the paired
   per-session differences (a slice of a few dozen sessions is noisy: a drop the noise
   explains is not evidence of a regression). Both
   models score the same slice: ids are mapped through each checkpoint's own
   ``item_ids``, unknown ones dropped.
c. **serves**: it loads through ``recloop.inference.LoadedModel.load`` (the replica's code
   path) and ``generate`` on one held-out request (beam width 8) returns a non-empty
   session.

The held-out slice is a list of ``{"history": [data item ids, oldest first], "items":
[engaged data item ids]}``. No pickle: checkpoints are safetensors + JSON.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

NOISE_Z = 2.0  # one-sided, about 2.3% of equal models' slices read as a regression

GATE_K = 10
GATE_BEAM = 8


@dataclass
class GateResult:
    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "metrics": self.metrics}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@torch.no_grad()
def holdout_metrics(
    model: Any,  # recloop.inference.LoadedModel
    holdout: Sequence[dict],
    k: int = GATE_K,
    batch_size: int = 64,
    per_session: list[float] | None = None,
    per_session_auc: list[float] | None = None,
) -> dict[str, Any]:
    """NDCG@k and recall@k of the engaged items of each held-out session, and the
    clicked-vs-skipped pair AUC among its served items (see the module docstring);
    ``per_session`` / ``per_session_auc`` receive each session's value. Raises
    ValueError on NaN scores."""
    hist, targets, skipped, contexts = [], [], [], []
    takes_context = getattr(model, "context", None) is not None
    for ex in holdout:
        t = [model.to_model[i] for i in ex["items"] if i in model.to_model]
        if not t:
            continue
        if takes_context:  # the row the round built for the session (as served)
            contexts.append(ex["context"])
        targets.append(list(dict.fromkeys(t)))  # distinct, in order
        hist.append([model.to_model[i] for i in ex["history"] if i in model.to_model])
        served = [model.to_model[i] for i in ex.get("served", []) if i in model.to_model]
        skipped.append([i for i in served if i not in set(t)])
    ndcg, recall, auc = [], [], []
    for lo in range(0, len(hist), batch_size):
        h, tg = hist[lo : lo + batch_size], targets[lo : lo + batch_size]
        sk = skipped[lo : lo + batch_size]
        rows = contexts[lo : lo + batch_size] if takes_context else None
        scores = model.ranker.score(h, None, rows).detach().float()  # (B, N+1)
        if torch.isnan(scores).any():
            raise ValueError("the model gives NaN scores")
        for b, (items, engaged) in enumerate(zip(h, tg, strict=True)):
            s = scores[b]
            valid = torch.ones_like(s, dtype=torch.bool)
            valid[0] = False
            if items:
                valid[torch.tensor(items, dtype=torch.long)] = False
            eng = torch.tensor(engaged, dtype=torch.long)
            valid[eng] = True  # an engaged item competes even if it is in the history
            ranks = ((s[None, :] >= s[eng][:, None]) & valid[None, :]).sum(1)  # (T,)
            hits = ranks[ranks <= k].double()
            dcg = float((1.0 / torch.log2(hits + 1.0)).sum())
            ideal = sum(1.0 / math.log2(i + 2.0) for i in range(min(len(engaged), k)))
            ndcg.append(dcg / ideal)
            recall.append(float(len(hits)) / len(engaged))
            if sk[b]:  # how often a clicked item outscores a skipped one of the session
                pos, neg = s[eng][:, None], s[torch.tensor(sk[b], dtype=torch.long)][None, :]
                auc.append(float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean()))
    n = len(ndcg)
    out = {
        f"ndcg@{k}": sum(ndcg) / n if n else None,
        f"recall@{k}": sum(recall) / n if n else None,
        "pair_auc": sum(auc) / len(auc) if auc else None,
        "sessions": n,
        "pair_sessions": len(auc),
        "engaged_items": sum(len(t) for t in targets),
    }
    if per_session is not None:
        per_session.extend(ndcg)
    if per_session_auc is not None:
        per_session_auc.extend(auc)
    return out


def gate(
    candidate_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
    holdout: Sequence[dict],
    tolerance: float,
    k: int = GATE_K,
    beam_width: int = GATE_BEAM,
) -> GateResult:
    """Checks (a) loads with finite weights, (b) NDCG@k on ``holdout`` not below the
    base's by more than ``tolerance`` (relative), (c) serves a session. ``base_dir``
    None (or a base that cannot be scored) skips the comparison in (b), never (a), (c)."""
    from recloop.checkpoint import CheckpointError, load_checkpoint
    from recloop.inference import LoadedModel

    metrics: dict[str, Any] = {"tolerance": tolerance, "k": k, "holdout": len(holdout)}
    # (a) the checkpoint loads and every weight is finite
    try:
        ck = load_checkpoint(candidate_dir)
    except (CheckpointError, OSError, KeyError, ValueError) as exc:
        return GateResult(False, f"candidate refused: {exc}", metrics)
    bad = [
        n
        for n, p in ck.model.state_dict().items()
        if p.is_floating_point() and not p.isfinite().all()
    ]
    if bad:  # load_checkpoint checks this already; belt and braces
        return GateResult(False, f"candidate has non-finite weights in {bad[:3]}", metrics)
    del ck
    try:
        cand = LoadedModel.load(str(candidate_dir), "candidate")
    except Exception as exc:
        return GateResult(False, f"candidate does not load for serving: {exc}", metrics)

    # (b) the offline metric on the held-out slice
    cs: list[float] = []
    bs: list[float] = []
    ca: list[float] = []
    ba: list[float] = []
    try:
        cm = holdout_metrics(cand, holdout, k, per_session=cs, per_session_auc=ca)
    except ValueError as exc:
        return GateResult(False, f"candidate: {exc}", metrics)
    metrics["candidate"] = cm
    base_note = ""
    if base_dir is None:
        base_note = "no base to compare with"
    else:
        try:
            base = LoadedModel.load(str(base_dir), "base")
            metrics["base"] = holdout_metrics(base, holdout, k, per_session=bs, per_session_auc=ba)
        except Exception as exc:  # the base serves now; if it cannot be scored, say so
            base_note = f"base not scored ({type(exc).__name__}: {exc})"
    # The gated metric: the pair AUC among served items when the slice has skipped
    # items (it does not favour the model that served them), else NDCG@k.
    key = f"ndcg@{k}"
    if cm.get("pair_auc") is not None and metrics.get("base", {}).get("pair_auc") is not None:
        key, cs, bs = "pair_auc", ca, ba
    metrics["gated_metric"] = key
    c, b = cm.get(key), metrics.get("base", {}).get(key)
    metrics["candidate_" + key], metrics["base_" + key] = _finite(c), _finite(b)
    if c is not None and b is not None:
        floor = b * (1.0 - tolerance)
        metrics["relative_change"] = (c - b) / b if b > 0 else None
        if len(cs) == len(bs) >= 2:  # the same sessions when both share the catalogue
            d = [x - y for x, y in zip(cs, bs, strict=True)]
            mean = sum(d) / len(d)
            var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
            metrics["paired_diff_se"] = math.sqrt(var / len(d))  # for reading the noise
        se = metrics.get("paired_diff_se")
        # A small slice is noisy: a drop below the floor rejects only when it is also
        # more than NOISE_Z paired standard errors (the noise cannot explain it).
        significant = se is None or (b - c) > NOISE_Z * se
        metrics["regression_significant"] = bool(c < floor - 1e-12 and significant)
        if c < floor - 1e-12 and significant:
            return GateResult(
                False,
                f"{key} {c:.4f} on {cm['sessions']} held-out sessions is below the base's "
                f"{b:.4f} by more than {tolerance:.1%} (floor {floor:.4f})",
                metrics,
            )
    elif c is None:
        base_note = (base_note + "; " if base_note else "") + "no held-out session to score"

    # (c) it serves a session
    req = next((ex for ex in holdout if ex.get("history")), holdout[0] if holdout else None)
    request = {
        "history": list(req["history"]) if req else [],
        "exclude_seen": True,
        "session_size": None,
    }
    try:
        out = cand.generate([request], beam_width=beam_width)
    except Exception as exc:
        return GateResult(False, f"candidate fails to generate: {exc}", metrics)
    items = out[0].get("items") if out else None
    if not items:
        return GateResult(False, "candidate generated an empty session", metrics)
    metrics["served_items"] = len(items)

    reason = "passed"
    if c is not None and b is not None:
        reason = f"{key} {c:.4f} vs base {b:.4f} (tolerance {tolerance:.1%})"
        if c < b * (1.0 - tolerance) - 1e-12:  # below the floor, within the slice's noise
            se = metrics.get("paired_diff_se") or 0.0
            reason += (
                f"; below the floor but within {NOISE_Z:g} paired SE ({se:.4f}) on "
                f"{cm['sessions']} held-out sessions"
            )
    if base_note:
        reason += f"; {base_note}"
    return GateResult(True, reason, metrics)
