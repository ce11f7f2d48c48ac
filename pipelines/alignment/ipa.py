"""Iterative preference alignment in the training rounds of an ``online-ipa`` arm.

OneRec's IPA (section 3.3.2, Algorithm 2): model M_{t+1} starts from M_t and trains on
preference pairs that M_t generated and the reward model ranked, with the DPO loss (eq.
10) beside the next-token loss. A round of such an arm (``train.dpo``) also

1. fine-tunes the arm's **session reward model** on the round's sessions of its data
   policy (all of them, not only the high-quality ones: the reward model needs the bad
   sessions too), holding out the newest 20% for per-target AUCs, publishes it to the
   registry lineage ``<arm>.reward`` and makes it current there when its held-out view
   AUC beats chance (the DPO sampler reloads it);
2. reads the preference pairs of ``recloop.preferences`` after the arm's last consumed
   offsets, up to the offsets at the round's start (at most ``dpo.max_pairs``), keeps
   the arm's own pairs and computes their **reference** log-probabilities with the
   version that generated each pair (fetched from the registry: pi_ref of eq. 10).

The offsets after the round's pairs are kept in the round in progress and become the
arm's consumed offsets in the same atomic state write that advances the lake marks, so
every pair is trained on in exactly one round (a crashed round re-reads the same range).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recloop.config import StackConfig

Progress = Callable[[str], None]
PAIR_KEYS = ("histories", "chosen", "rejected", "ref_chosen", "ref_rejected")
MIN_REWARD_AUC = 0.5  # a reward model is made current only if it ranks views above chance


# --------------------------------------------------------------------------- pairs
def read_pairs(
    cfg: StackConfig, start: dict[str, int], max_pairs: int
) -> tuple[list[Any], dict[str, int], int]:
    """Preference events after ``start`` (partition -> next offset, as strings in JSON
    state) up to the topic's end now, at most ``max_pairs`` per partition. Returns (the
    events, the offsets after them, records that failed their contract)."""
    from recloop.events import Preference
    from recloop.kafka_io import end_offsets, read_range

    begin = {int(p): int(o) for p, o in start.items()}
    end = end_offsets(cfg.kafka.bootstrap, Preference.topic)
    end = {p: min(e, begin.get(p, 0) + max_pairs) for p, e in end.items()}
    events, invalid = read_range(cfg.kafka.bootstrap, Preference.topic, begin, end)
    after = {str(p): max(e, begin.get(p, 0)) for p, e in end.items()}
    return events, after, len(invalid)


@dataclass
class PairSet:
    """A round's preference pairs in the base model's item ids, with reference log p."""

    histories: torch.Tensor  # (P, H) left-padded
    chosen: torch.Tensor  # (P, M) right-padded
    rejected: torch.Tensor  # (P, M)
    ref_chosen: torch.Tensor  # (P,) log pi_ref(chosen | history)
    ref_rejected: torch.Tensor  # (P,)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    @classmethod
    def empty(cls, max_history: int, session_len: int) -> PairSet:
        z = torch.zeros(0, dtype=torch.float32)
        return cls(
            torch.zeros(0, max_history, dtype=torch.long),
            torch.zeros(0, session_len, dtype=torch.long),
            torch.zeros(0, session_len, dtype=torch.long),
            z,
            z.clone(),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in PAIR_KEYS}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from recloop.lake import write_with

        write_with(path, lambda tmp: save_file(self.tensors(), tmp))

    @classmethod
    def load(cls, path: Path) -> PairSet:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(*(t[k] for k in PAIR_KEYS))


def _ids(items: Sequence[int], to_model: dict[int, int]) -> list[int] | None:
    out = [to_model.get(int(i)) for i in items]
    return None if any(i is None for i in out) else out  # type: ignore[return-value]


def build_pairs(
    events: Sequence[Any],
    arm: str,
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    reference: Callable[[str], Any],
) -> PairSet:
    """The arm's pairs as tensors. ``reference(version)`` returns the OneRec model of a
    generating version (None if the registry does not have it: such pairs are dropped);
    reference log-probabilities come from it, in eval mode."""
    from models.dpo import session_logprob
    from pipelines.offline.train_onerec import code_table, pad_histories

    to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
    info = {"read": len(events), "other_arm": 0, "unknown_items": 0, "no_reference": 0}
    rows: dict[str, list[tuple[list[int], list[int], list[int]]]] = {}
    for ev in events:
        if ev.arm != arm:
            info["other_arm"] += 1
            continue
        chosen, rejected = _ids(ev.chosen, to_model), _ids(ev.rejected, to_model)
        if not chosen or not rejected or len(chosen) > session_len or len(rejected) > session_len:
            info["unknown_items"] += 1
            continue
        hist = [to_model[i] for i in ev.history if i in to_model]
        rows.setdefault(ev.model_version, []).append((hist, chosen, rejected))
    parts: list[PairSet] = []
    versions: dict[str, int] = {}
    for version, group in sorted(rows.items()):
        ck = reference(version)
        if ck is None:
            info["no_reference"] += len(group)
            continue
        model = ck.model.eval()
        codes = code_table(ck.tokenizer, ck.tokenizer.num_items)
        h = pad_histories([g[0] for g in group], max_history)
        c = torch.tensor([g[1] + [0] * (session_len - len(g[1])) for g in group])
        r = torch.tensor([g[2] + [0] * (session_len - len(g[2])) for g in group])
        with torch.no_grad():
            ref_c = session_logprob(model, h, codes[h], codes[c], c > 0)
            ref_r = session_logprob(model, h, codes[h], codes[r], r > 0)
        parts.append(PairSet(h, c, r, ref_c.float(), ref_r.float()))
        versions[version] = len(group)
    if not parts:
        out = PairSet.empty(max_history, session_len)
    else:
        out = PairSet(*(torch.cat([getattr(p, k) for p in parts]) for k in PAIR_KEYS))
    out.info = {**info, "pairs": len(out), "versions": versions}
    return out


def registry_reference(reg: Any, lineage: str, cache_dir: Path):
    """``reference`` for ``build_pairs``: a version of ``lineage`` loaded from the
    registry (None when the lineage does not hold it)."""
    from recloop.checkpoint import load_checkpoint

    known = set(reg.versions(lineage))

    def load(version: str):
        if version not in known:
            return None
        return load_checkpoint(reg.fetch(lineage, version, cache_dir=cache_dir))

    return load


# --------------------------------------------------------------------------- reward model
def update_reward_model(
    cfg: StackConfig,
    reg: Any,
    arm: str,
    rows: Sequence[dict],
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    round_no: int,
    work_dir: Path,
    progress: Progress = print,
) -> dict[str, Any]:
    """Fine-tune the arm's current reward model (or fit one) on ``rows``, publish it to
    ``<arm>.reward`` and make it current if its held-out view AUC beats chance. Returns
    what happened (version, AUCs, promoted), for the round's record."""
    import shutil

    from models.reward import RewardConfig
    from pipelines.alignment.reward import RewardTrainConfig, fit_reward, reward_data
    from recloop.checkpoint import load_reward, save_reward
    from recloop.registry import reward_arm
    from recloop.train_state import plain

    t0 = time.monotonic()
    name = reward_arm(arm)
    reg.create_arm(name, name)
    init, base_version = None, reg.current(name)
    if base_version is not None:
        ck = load_reward(reg.fetch(name, base_version, cache_dir=work_dir / "cache"))
        if list(ck.item_ids) == [int(i) for i in item_ids]:
            init = ck.model
    rcfg = (
        init.cfg
        if init is not None
        else RewardConfig(
            num_items=len(item_ids), max_history=max_history, max_items=max(16, session_len)
        )
    )
    data = reward_data(rows, item_ids, rcfg.max_history, rcfg.max_items)
    if len(data) < 10:
        return {"status": "skipped", "reason": f"{len(data)} sessions", "base": base_version}
    train = RewardTrainConfig(epochs=cfg.dpo.reward_epochs, lr=cfg.dpo.reward_lr, seed=round_no)
    model, report = fit_reward(data, rcfg, train, init=init, log=lambda m: None)
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    version = f"{arm[:40]}-rm-r{round_no:05d}-{stamp}"
    out = work_dir / f"reward-r{round_no:05d}"
    shutil.rmtree(out, ignore_errors=True)
    save_reward(out, model, item_ids, {"round": round_no, "base_version": base_version})
    reg.publish(name, out, version=version, metrics=plain(report))
    shutil.rmtree(out, ignore_errors=True)
    auc = (report.get("holdout") or {}).get("auc", {})
    vtr = auc.get("vtr")
    promoted = vtr is not None and vtr > MIN_REWARD_AUC
    if promoted:
        reg.promote(name, version)
    result = {
        "status": "promoted" if promoted else "kept " + str(base_version),
        "version": version,
        "base": base_version,
        "sessions": len(data),
        "holdout": report.get("holdout"),
        "epochs": report.get("epochs"),
        "seconds": round(time.monotonic() - t0, 2),
    }
    progress(
        f"reward model {version}: {len(data)} sessions, held-out AUC "
        + ", ".join(f"{k} {v:.3f}" for k, v in auc.items() if v is not None)
        + f"; {'current' if promoted else 'not made current'}"
    )
    return result


# --------------------------------------------------------------------------- a round's inputs
def round_inputs(
    cfg: StackConfig,
    reg: Any,
    offsets: dict[str, int],
    rows: Sequence[dict],
    item_ids: Sequence[int],
    model_cfg: Any,  # the base's OneRecConfig
    round_no: int,
    lineage: str,
    work_dir: Path,
    progress: Progress = print,
    reference: Callable[[str], Any] | None = None,
) -> tuple[PairSet, dict[str, int], dict[str, Any]]:
    """What an IPA round adds to a round: the updated reward model (first, so the
    sampler ranks the next pairs with it), and the pairs after ``offsets``. Returns
    (pairs, the offsets after them, the reward model's record). ``reference(version)``:
    the pairs' reference models (default: read from the registry)."""
    arm = cfg.train.arm
    reward = update_reward_model(
        cfg,
        reg,
        arm,
        rows,
        item_ids,
        model_cfg.max_history,
        model_cfg.session_len,
        round_no,
        work_dir,
        progress,
    )
    events, after, invalid = read_pairs(cfg, offsets, cfg.dpo.max_pairs)
    ref = reference or registry_reference(reg, lineage, work_dir / "cache")
    pairs = build_pairs(events, arm, item_ids, model_cfg.max_history, model_cfg.session_len, ref)
    pairs.info.update(invalid=invalid, offsets_before=dict(offsets), offsets_after=after)
    progress(
        f"round {round_no}: {len(pairs)} preference pairs of {len(events)} read "
        f"(offsets {dict(offsets)} -> {after}; by version {pairs.info['versions']})"
    )
    return pairs, after, reward
