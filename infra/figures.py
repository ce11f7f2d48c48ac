"""The figures of the README and the docs, rendered from the results files that make them.

    python -m infra.figures           # rewrite every block in place (`make figures`)
    python -m infra.figures --check   # exit 1 and name each block that differs from its JSON

A block of a page sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``;
``NAME`` is a function below that reads the JSONs under ``benchmarks/results/`` it names
(``WRITERS`` says which command writes each) and returns the block's markdown. Every
number of a block is read from those files: a missing file or key is an error that names
it, and a sentence whose claim the numbers no longer support (``claim``) is an error too,
so a new run either renders or says which text to rewrite. ``tests/unit/test_figures.py``
fails when a page's block differs from what its JSONs give.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from recloop.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
WIDTH = 88

# Each results file a block reads, and the command that writes it.
WRITERS: dict[str, str] = {
    "demo/summary.json": "recloop demo --out benchmarks/results/demo",
    "training.json": "make bench-training",
    "ipa_1pct.json": "make bench-ipa",
    "ipa_5pct.json": "make bench-ipa",
    "ipa_offline.json": "make bench-ipa-offline",
    "loop_offline.json": "make bench-loop-offline",
    "bias.json": "make bench-bias",
    "sim_fit_ml100k.json": "make bench-sim-fit",
    "ab_sanity.json": "make bench-ab",
    "serving.json": "make bench-serving",
    "beam_search.json": "make bench-beam",
    "ingest.json": "make bench-ingest",
    "simulator.json": "make bench-simulator",
    "kafka_throughput.json": "make bench-kafka",
    "faults.json": "python -m benchmarks.faults",
    "eval_compare_ml100k_hybrid.json": "recloop eval (the command in docs/benchmarks.md)",
    "onepiece_ml100k.json": "recloop eval (the command in docs/benchmarks.md)",
    "ablations_ml100k.json": "recloop ablate",
    "scaling_ml100k.json": "recloop scaling --out benchmarks/results/scaling_ml100k.json",
    "scale.json": "make bench-scale",
}

MARKER = re.compile(
    r"^(?P<indent>[ ]*)<!-- figures:(?P<name>[a-z0-9-]+) -->\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)<!-- /figures:(?P=name) -->[ ]*$",
    re.M | re.S,
)
OPENING = re.compile(r"<!-- figures:([a-z0-9-]+) -->")


class FigureError(Exception):
    """A block cannot be rendered: a file or key is missing, or its text no longer holds."""


# ---------------------------------------------------------------------------- the data


def _path(keys: tuple[Any, ...]) -> str:
    return "".join(f"[{k!r}]" for k in keys) or "(the whole file)"


class Data:
    """A results JSON, or a part of it: ``d["ab", "arms"]`` is ``json["ab"]["arms"]``.

    A missing or null key is a ``FigureError`` naming the file and the key path; a dict or
    list comes back as ``Data`` (so its keys are checked too), anything else as it is.
    """

    def __init__(self, value: Any, file: str, path: tuple[Any, ...] = ()) -> None:
        self.value, self.file, self.path = value, file, path

    def _at(self, keys: Any) -> tuple[Any, tuple[Any, ...]]:
        value, path = self.value, self.path
        for k in keys if isinstance(keys, tuple) else (keys,):
            path = (*path, k)
            try:
                value = value[k]
            except (KeyError, IndexError, TypeError):
                raise FigureError(
                    f"benchmarks/results/{self.file} has no key {_path(path)} "
                    f"(`{WRITERS.get(self.file, '?')}` writes it)"
                ) from None
        return value, path

    def __getitem__(self, keys: Any) -> Any:
        value, path = self._at(keys)
        if value is None:
            raise FigureError(f"benchmarks/results/{self.file}: {_path(path)} is null")
        return Data(value, self.file, path) if isinstance(value, dict | list) else value

    def get(self, keys: Any, default: Any = None) -> Any:
        """The value at ``keys``, or ``default`` when it is missing or null."""
        try:
            return self[keys]
        except FigureError:
            return default

    def keys(self) -> list[Any]:
        return list(self.value) if isinstance(self.value, dict) else list(range(len(self)))

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.value, dict):
            return iter(list(self.value))
        return (self[i] for i in range(len(self.value)))

    def __len__(self) -> int:
        return len(self.value)

    def __contains__(self, key: Any) -> bool:
        return key in self.value

    @property
    def raw(self) -> Any:
        return self.value


def load(name: str) -> Data:
    """``benchmarks/results/NAME`` as ``Data``."""
    path = RESULTS / name
    if not path.is_file():
        raise FigureError(
            f"benchmarks/results/{name} is missing (`{WRITERS.get(name, '?')}` writes it)"
        )
    try:
        return Data(json.loads(path.read_text()), name)
    except json.JSONDecodeError as e:
        raise FigureError(f"benchmarks/results/{name} is not JSON: {e}") from None


def claim(holds: bool, text: str) -> None:
    """The block's words say ``text``; fail when the numbers no longer do."""
    if not holds:
        raise FigureError(f"the text says {text!r}, which the results no longer show: rewrite it")


# ---------------------------------------------------------------------------- formatting

MINUS = "\u2212"
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
WORDS |= {8: "eight", 9: "nine", 10: "ten"}
ORDINALS = ["first", "second", "third", "fourth", "fifth"]
ORDINALS += ["sixth", "seventh", "eighth", "ninth", "tenth"]
SHARES = {0.25: "a quarter", 0.5: "a half", 1.0: "all"}


def _fixed(x: float, d: int, sign: bool = False) -> str:
    """``x`` to ``d`` decimals, halves rounded up as a person would (1478.5 → 1479)."""
    q = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-d), rounding=ROUND_HALF_UP)
    text = f"{q:+.{d}f}" if sign else f"{q:.{d}f}"
    return text.replace("-", MINUS)


def num(x: float, d: int = 1) -> str:
    return _fixed(x, d)


def spct(x: float, d: int = 1) -> str:
    """A signed percentage: ``+18.4%``, ``−4.3%``."""
    return _fixed(100 * x, d, sign=True) + "%"


def pct(x: float, d: int = 1) -> str:
    return _fixed(100 * x, d) + "%"


def ci(bounds: Data, d: int = 1) -> str:
    return f"[{spct(bounds[0], d)}, {spct(bounds[1], d)}]"


def pval(p: float) -> str:
    if p >= 0.01:
        s = _fixed(p, 2)
    elif p >= 1e-4:
        s = f"{p:.1g}"
    else:
        mantissa, exponent = f"{p:.0e}".split("e")
        s = f"{mantissa}e{MINUS}{int(exponent[1:])}"
    return f"p = {s}"


def count(n: float) -> str:
    """``3793``, ``20 403``: a space between thousands from five digits on."""
    n = int(_fixed(n, 0).replace(MINUS, "-"))
    return f"{n:,}".replace(",", " ") if abs(n) >= 10_000 else str(n)


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    """``0.6–5.9``: the smallest and the largest, or one value when they print alike."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def ratio(x: float, d: int = 2) -> str:
    return f"{_fixed(x, d)}×"


def pspan(values: list[float], d: int = 1) -> str:
    """``5.5–6.7%``: a span of shares, the percent sign once."""
    lo, hi = num(100 * min(values), d), num(100 * max(values), d)
    return f"{lo}%" if lo == hi else f"{lo}–{hi}%"


def word(n: int) -> str:
    return WORDS.get(n, str(n))


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``8th``, ``11th``, ``22nd``."""
    end = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{end}"


def minutes(seconds: float) -> str:
    return f"~{max(1, round(seconds / 60))} min"


def share(x: float) -> str:
    return SHARES.get(x, pct(x, 0))


def mparams(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def _data_read(summary: dict) -> str:
    """What the training summary says of the rounds' data read (runs before the rounds
    read through Ray Data say nothing)."""
    if summary.get("data_read_s_median") is None:
        return ""
    engines = summary.get("data_engines") or []
    how = "through Ray Data" if engines == ["ray"] else f"engines {', '.join(engines)}"
    return f" (of it the sessions read and mapped {how}: {num(summary['data_read_s_median'], 2)} s)"


def para(*sentences: str) -> str:
    """One paragraph, wrapped."""
    return textwrap.fill(" ".join(sentences), WIDTH, break_long_words=False, break_on_hyphens=False)


def bullets(*items: str) -> str:
    return "\n".join(
        textwrap.fill(
            item,
            WIDTH,
            initial_indent="- ",
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for item in items
    )


def quote(text: str) -> str:
    return textwrap.fill(
        text,
        WIDTH,
        initial_indent="> ",
        subsequent_indent="> ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def blocks(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Block:
    name: str
    sources: tuple[str, ...]
    render: Callable[..., str]


BLOCKS: dict[str, Block] = {}


def block(name: str, *sources: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register ``fn(*data)`` as the block ``name``, given its sources as ``Data``."""

    def register(fn: Callable[..., str]) -> Callable[..., str]:
        unknown = [s for s in sources if s not in WRITERS]
        if unknown:
            raise ValueError(f"{name}: no writer recorded for {unknown}")
        BLOCKS[name] = Block(name, sources, fn)
        return fn

    return register


def render_block(name: str) -> str:
    """The markdown of block ``name`` from its JSONs."""
    if name not in BLOCKS:
        raise FigureError(f"no block named {name!r} in infra/figures.py")
    b = BLOCKS[name]
    try:
        return b.render(*(load(s) for s in b.sources)).strip("\n")
    except FigureError as e:
        raise FigureError(f"figures:{name}: {e}") from None


# ---------------------------------------------------------------------------- shared reads


def comparison(rows: Data, arm: str, metric: str) -> Data:
    """The comparison of ``arm`` on ``metric`` in a list of A/B comparisons."""
    for c in rows:
        if c["arm"] == arm and c["metric"] == metric:
            return c
    raise FigureError(f"benchmarks/results/{rows.file}: no {arm}/{metric} in {_path(rows.path)}")


def significant(c: Data) -> bool:
    return c["verdict"] in ("win", "loss")


def short_verdict(c: Data) -> str:
    return c["verdict"] if significant(c) else "n.s."


def model_rows(e: Data) -> dict[str, Data]:
    return {r["model"]: r for r in e["results"]}


def picked(rows: dict[str, Data]) -> str:
    """The OneRec row with the best validation NDCG@10: the one the figure quotes."""
    onerec = [m for m in rows if m.startswith("onerec")]
    claim(bool(onerec), "OneRec is in the run")
    return max(onerec, key=lambda m: rows[m]["metrics", "val_full", "NDCG@10"])


SCORINGS = {"sid": "SID score", "item": "next-item head", "hybrid": "hybrid"}


def eval_label(model: str, row: Data) -> str:
    if model == "pop":
        return "popularity"
    if model == "sasrec":
        return "SASRec"
    base = model.split(":")[0]
    variant = f" @{base.split('@')[1]}" if "@" in base else ""
    return f"OneRec{variant}, {SCORINGS.get(row['scoring'], row['scoring'])}"


def trained_model(model: str) -> str:
    return model.split(":")[0]


def train_cell(model: str, row: Data, seen: set[str]) -> str:
    """Training time of a model's first row; later scorings of it say so."""
    key = trained_model(model)
    if key in seen:
        return "(same model)"
    seen.add(key)
    epochs = row.get(("train_info", "epochs_run"))
    extra = f" ({epochs} epochs)" if epochs is not None and key.startswith("onerec") else ""
    return f"{row['train_seconds']:.0f} s{extra}"


def paired(e: Data, a: str, b: str) -> dict[str, Any]:
    """``python -m pipelines.analysis.paired`` on two rows of one run (NDCG@10)."""
    from pipelines.analysis.paired import compare

    try:
        return compare(e.raw, a, b)["NDCG@10"]
    except ValueError as err:
        raise FigureError(f"benchmarks/results/{e.file}: {err}") from None


def paired_text(r: dict[str, Any]) -> str:
    """``+0.0005 [−0.0116, +0.0122]``: the paired difference with its 95% interval."""
    return f"{_sd(r['diff'])} [{_sd(r['ci95'][0])}, {_sd(r['ci95'][1])}]"


def _sd(x: float) -> str:
    return f"{x:+.4f}".replace("-", MINUS)


def best_epoch(row: Data) -> tuple[int, float]:
    """The epoch (1-based) with the best validation NDCG@10, and that value."""
    if "best_epoch" in row["train_info"]:
        return row["train_info", "best_epoch"], row["train_info", "best_val_ndcg@10"]
    history = row["train_info", "history"]
    vals = [h["val_ndcg10"] for h in history]
    i = max(range(len(vals)), key=vals.__getitem__)
    return i + 1, vals[i]


def demo_learning_arms(s: Data) -> list[str]:
    """The arms that trained rounds (the popularity arm recounts instead)."""
    return [a for a in s["training"] if len(s["training", a])]


def demo_verdict(s: Data, arm: str, metric: str = "swt") -> Data:
    return comparison(s["verdict"], arm, metric)


def demo_quote(s: Data, verdicts: bool) -> str:
    parts = []
    swt = [c for c in s["verdict"] if c["metric"] == "swt"]
    for c in swt:
        words = f" ({c['verdict']})" if verdicts else ""
        parts.append(f"{c['arm']} {spct(c['rel_lift'])} {ci(c['ci'])}, {pval(c['p_value'])}{words}")
    text = quote("session watch time against control: " + "; ".join(parts))
    return blocks(text, para(cuped_note([(c["arm"], c) for c in swt])))


def cuped_note(labelled: list[tuple[str, Data]]) -> str:
    """A sentence on the CUPED adjustment of these (label, comparison) pairs, with the
    plain figures beside the adjusted ones, or "" when they were not adjusted. A
    comparison holds them flat (the demo's ``unadjusted_*``) or under ``unadjusted``."""
    cs = [(a, c) for a, c in labelled if c.get("variance_reduction") is not None]
    if not cs:
        return ""
    cut = [c["variance_reduction"] for _, c in cs]

    def plain(c: Data, key: str) -> float | None:
        if f"unadjusted_{key}" in c.keys():
            return c[f"unadjusted_{key}"]
        return c["unadjusted", key] if "unadjusted" in c.keys() else None

    plain_text = "; ".join(
        f"{a} {spct(lift)} ({pval(plain(c, 'p_value'))})"
        if (lift := plain(c, "rel_lift")) is not None
        else f"{a} {pval(plain(c, 'p_value'))}"
        for a, c in cs
    )
    return (
        "Adjusted by CUPED for how much history each user came with (named in the run "
        f"file before the run; it took {pspan(cut, 0)} of the variance out). Unadjusted: "
        f"{plain_text}."
    )


def demo_last_tenth(s: Data) -> dict[str, float]:
    return {a: s["online_over_time", a, -1, "swt"] for a in s["online_over_time"]}


def demo_traffic_min(s: Data) -> str:
    return f"{s['run', 'wall_s'] / 60:.1f} minutes"


def ahead(a: float, b: float) -> str:
    return "ahead of" if a > b else "behind"


def ipa_pairs(d: Data) -> list[int]:
    return [r["trained_pairs"] for r in d["rounds_by_arm", "online-ipa"]]


def ipa_fraction(d: Data) -> str:
    return pct(d["dpo_fraction"], 0)


def sampler_share(d: Data) -> float:
    return d["dpo_sampler", "cpu_s"] / d["dpo_sampler", "uptime_s"]


def fault(f: Data, test_part: str) -> Data:
    for rec in f["faults"]:
        if test_part in rec["test"]:
            return rec
    raise FigureError(f"benchmarks/results/faults.json: no fault whose test has {test_part!r}")


def beam_models(b: Data) -> tuple[Data, Data]:
    """The served checkpoint's rows and the default config's (random weights)."""
    served = [m for m in b["models"] if m.get("checkpoint") is not None]
    default = [m for m in b["models"] if m.get("checkpoint") is None]
    claim(len(served) == 1 and len(default) == 1, "one served checkpoint and the default config")
    return served[0], default[0]


def by_batch(model: Data, key: str, fmt: Callable[[float], str]) -> str:
    return " / ".join(fmt(r[key]) for r in model["rows"])


def serving_levels(s: Data) -> list[str]:
    return sorted(s["batched"].keys(), key=int)


def per_level(s: Data, part: str, key: str, fmt: Callable[[float], str]) -> str:
    return " / ".join(fmt(s[part, c, key]) for c in serving_levels(s))


def replica_cores(s: Data, c: str, router: bool) -> list[float]:
    cores = s["batched", c, "replica_cpu_cores"]
    return [cores[k] for k in cores if k.startswith("Router") == router]


def sim_fit_headline(f: Data) -> str:
    d = f["default"]
    return (
        f"{d} hidden model watch AUC **{f['kinds', d, 'watch_auc']:.3f}** "
        + "("
        + ", ".join(f"{k} {f['kinds', k, 'watch_auc']:.3f}" for k in f["kinds"] if k != d)
        + f", item popularity {f['popularity', 'watch_auc']:.3f}); next-item NDCG@10 "
        f"{f['kinds', d, 'next_item', 'NDCG@10']:.3f} "
        f"(SASRec {f['sasrec_next_item', 'NDCG@10']:.3f})"
    )


def ingest_backlog(i: Data, client: str) -> Data:
    return i["backlog", client]


def ipa_offline_dpo(o: Data, one_per_request: bool = False) -> list[str]:
    """The DPO variants by mirrored share: with the sampler's pairs per request, or (the
    ``<ratio>/1`` variants) only the first pair of each request."""
    return sorted(
        (
            k
            for k in o["summary"]
            if o["summary", k, "pairs"] > 0 and k.endswith("/1") == one_per_request
        ),
        key=lambda k: o["summary", k, "requests"],
    )


def ipa_offline_truth(o: Data) -> str:
    """How often the chosen session is the better one by the hidden model, per rank."""
    ranks = o["pair_truth_by_rank"]
    first, last = ranks[min(ranks, key=int)], ranks[max(ranks, key=int)]
    return (
        f"{pct(first['chosen_better'], 0)} of the first pairs (best vs worst; "
        f"{num(first['expected_watch_gap_s'], 1)} s apart in expected watch time) to "
        f"{pct(last['chosen_better'], 0)} of the {ordinal(len(ranks))} "
        f"({num(last['expected_watch_gap_s'], 1)} s)"
    )


def lift_se(o: Data, k: str, what: str = "expected_watch_s") -> str:
    lift, se = o["summary", k, f"{what}_lift"], o["summary", k, f"{what}_lift_se"]
    text = f"{spct(lift)} ± {pct(se)}"
    return f"**{text}**" if what == "expected_watch_s" and abs(lift) > 2 * se else text


def loop_lift(o: Data, arm: str, part: str = "last") -> tuple[float, float]:
    """(mean, smallest) lift of ``arm`` over control across the runs, whole run
    (``all``) or last third (``last``)."""
    d = o[f"lift_{part}", arm]
    return d["mean"], d["min"]


def loop_unweighted(o: Data) -> list[str]:
    """The arms of the run whose rounds weigh every click alike."""
    return [k for k in o["arms"] if o["arms", k].raw.get("train.reward_weighting") == "none"]


def loop_ahead_runs(o: Data, arm: str, other: str, part: str = "last") -> int:
    """In how many runs ``arm``'s lift is above ``other``'s."""
    a, b = o[f"lift_{part}", arm, "runs"], o[f"lift_{part}", other, "runs"]
    return sum(x > y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- rows of both tables


def row_training(t: Data, short: bool) -> list[str]:
    swt = comparison(t["ab", "comparisons"], "online", "swt")
    pop = comparison(t["ab", "comparisons"], "popularity", "swt")
    last = t["oracle_by_tenth", "last_tenth_swt"]
    rounds = t["rounds"]
    times = [r["round_s"] for r in rounds]
    sessions = sum(t["ab", "arms", a, "sessions"] for a in t["ab", "arms"])
    warm = t["warm_vs_bare", "warm_vs_bare"]
    lift = spct(swt["rel_lift"])
    lift = f"**{lift}**" if swt["verdict"] == "win" else lift  # bold: significant only
    if short:
        return [
            "Online learning through the whole loop: online vs frozen vs popularity, "
            f"{sessions} sessions, sequential users with taste drift",
            "`make bench-training`",
            f"online {lift} session watch time vs the frozen seed "
            f"{ci(swt['ci_delta'])}, {pval(swt['p_value'])}; popularity "
            f"{spct(pop['rel_lift'])}; last tenth online {last['online']:.1f} s vs popularity "
            f"{last['popularity']:.1f} s per session; rounds of {span(times, num)} s; warm "
            f"trainer **{ratio(warm)}** a bare loop's examples/s",
        ]
    summary = t["round_summary_by_arm", "online"]
    hq = statistics.median(r["hq_sessions"] for r in rounds)
    epochs = t["warm_vs_bare", "epochs"]
    return [
        "Online vs frozen vs popularity A/B, MovieLens, sequential users with taste drift, "
        "whole loop (ingestor actor, warm trainer, Serve hot swaps), "
        f"{sessions} sessions",
        "`make bench-training`",
        f"online {lift} swt {ci(swt['ci_delta'])}, "
        f"{pval(swt['p_value'])}; popularity {spct(pop['rel_lift'])} ({pval(pop['p_value'])}); "
        f"last tenth online {last['online']:.1f} s vs popularity {last['popularity']:.1f} s; "
        f"{summary['decided']} {word(epochs)}-epoch rounds of ~{hq:.0f} sessions, "
        f"**{span(times, num)} s** each; warm trainer **{ratio(warm)}** a bare loop's "
        f"examples/s; feedback-to-serving p50 **{summary['feedback_to_served_p50_s']:.1f} s** "
        "per promotion; see [Continuous training](training.md)",
    ]


def row_ipa(one: Data, five: Data, short: bool) -> list[str]:
    runs = (one, five)
    vs_online = [comparison(d["ab_vs_online"], "online-ipa", "swt") for d in runs]
    vs_control = [comparison(d["ab", "comparisons"], "online", "swt") for d in runs]

    def said(c: Data) -> str:
        if not significant(c):
            return "n.s."
        return "a win" if c["rel_lift"] > 0 else "a loss"

    sessions = {sum(d["ab", "arms", a, "sessions"] for a in d["ab", "arms"]) for d in runs}
    fractions = " and ".join(ipa_fraction(d) for d in runs)
    ps = [pval(c["p_value"]) for c in vs_control]
    lifts = " / ".join(spct(c["rel_lift"]) for c in vs_control)
    what = (
        f"online-ipa vs online vs frozen, {' / '.join(map(str, sorted(sessions)))} sessions, "
        f"{fractions} mirrored"
    )
    if short:
        each = " and ".join(
            f"{spct(c['rel_lift'])} ({ipa_fraction(d)}, {sum(ipa_pairs(d))} pairs, "
            f"{pval(c['p_value'])}: {said(c)})"
            for c, d in zip(vs_online, runs, strict=True)
        )
        p = ps[0] if len(set(ps)) == 1 else " / ".join(ps)
        plain = ""
        if all(c.get("variance_reduction") is not None for c in vs_online):
            plain = (
                " (CUPED-adjusted for the users' pre-run history; unadjusted "
                + " / ".join(spct(c["unadjusted", "rel_lift"]) for c in vs_online)
                + ", "
                + " / ".join(pval(c["unadjusted", "p_value"]) for c in vs_online)
                + ")"
            )
        return [
            f"Preference alignment online: {what}",
            "`make bench-ipa`",
            f"online-ipa vs online {each}{plain}; online vs frozen **{lifts}**, {p}",
        ]
    each = " and ".join(
        f"{spct(c['rel_lift'])} {ci(c['ci_delta'])} ({ipa_fraction(d)}, {sum(ipa_pairs(d))} "
        f"pairs, {pval(c['p_value'])}: {said(c)})"
        for c, d in zip(vs_online, runs, strict=True)
    )
    p = f"{ps[0]} in both runs" if len(set(ps)) == 1 else " / ".join(ps)
    cpu = [d["dpo_sampler", "cpu_s_per_request"] for d in runs]
    shares = " / ".join(pct(sampler_share(d), 2) for d in runs)
    dropped = sum(d["dpo_sampler", "counts", "dropped_full"] for d in runs)
    return [
        f"Preference alignment A/B: {what.replace(' vs frozen', ' vs frozen, MovieLens')}, "
        "sequential users, taste drift, whole loop (sampler actor, reward model, DPO rounds)",
        "`make bench-ipa`",
        f"online-ipa vs online swt {each}; online vs control "
        f"**{lifts}** ({p}); sampler **{span(cpu, lambda x: num(x, 2))} s CPU per mirrored "
        f"request**, {shares} of a core at {' / '.join(ipa_fraction(d) for d in runs)}, "
        f"{dropped} dropped; see [Preference alignment](preference-alignment.md)",
    ]


def row_loop_offline(o: Data, short: bool) -> list[str]:
    runs, users = len(o["seeds"]), o["users"]
    on, on_min = loop_lift(o, "online")
    pop, _ = loop_lift(o, "popularity")
    ahead = loop_ahead_runs(o, "online", "popularity")
    claim(ahead > len(o["seeds"]) / 2, "online ends ahead of popularity in most runs")
    if short:
        return [
            "The loop offline: learning rounds vs frozen seed and popularity, simulated users",
            f"`make bench-loop-offline` ({minutes(o['wall_s'])})",
            f"last third of {runs} runs: online **{spct(on)}** expected watch time over the "
            f"frozen seed (smallest {spct(on_min)}), popularity {spct(pop)}; online ahead of "
            f"popularity in {ahead} of {runs}",
        ]
    ntp = loop_unweighted(o)
    rest = ""
    if ntp:
        rest = f"; every click alike ({ntp[0]}): {spct(loop_lift(o, ntp[0])[0])}"
    return [
        "The loop without the stack: the real rounds (warm trainer, gate, registry, lake "
        f"format), {o['hidden_user_model']} users with the demo's drift, {users} users per "
        f"run (the demo's per arm), {o['steps']} sessions each, {runs} traffic seeds",
        f"`make bench-loop-offline` ({minutes(o['wall_s'])})",
        f"expected watch time vs the frozen seed, last third, mean of the runs [smallest]: "
        f"online (watch-weighted rounds) **{spct(on)}** [{spct(on_min)}], popularity "
        f"{spct(pop)}{rest}; online ahead of popularity in {ahead} of {runs} runs; see "
        "[Continuous training](training.md)",
    ]


def row_ipa_offline(o: Data, short: bool) -> list[str]:
    dpo = ipa_offline_dpo(o)
    su = o["summary"]
    round_gain = su["0", "expected_watch_s"] / su["seed", "expected_watch_s"] - 1
    lifts = []
    for k in dpo:
        lift, se = su[k, "expected_watch_s_lift"], su[k, "expected_watch_s_lift_se"]
        lifts.append(f"**{spct(lift)}**" if abs(lift) > 2 * se else spct(lift))
    ses = [su[k, "expected_watch_s_lift_se"] for k in dpo]
    second = abs(su["0/seed+1", "expected_watch_s_lift"])
    pairs = " / ".join(str(su[k, "pairs"]) for k in dpo)
    shares = " / ".join(pct(su[k, "requests"] / o["logged_sessions"], 0) for k in dpo)
    if short:
        return [
            "Preference alignment offline, paired, hidden-model ground truth",
            f"`make bench-ipa-offline` ({minutes(o['wall_s'])})",
            f"a round ({weighting(o)}) **{spct(round_gain)}** expected watch time over the "
            f"seed; DPO on top of it {' / '.join(lifts)} with {shares} of the sessions "
            f"mirrored ({pairs} pairs; a second training seed moves the round by "
            f"{pct(second)})",
        ]
    return [
        "IPA offline and paired: rounds with DPO vs the same round without, on the same "
        f"logged sessions, hidden-model ground truth ({o['hidden_user_model']} users), "
        f"{o['heldout_users']} held-out users, {word(o['epochs'])}-epoch rounds, "
        f"{weighting(o)}",
        f"`make bench-ipa-offline` ({minutes(o['wall_s'])})",
        f"the round without DPO: **{spct(round_gain)}** expected watch time over the seed; "
        f"DPO adds {' / '.join(lifts)} with {pairs} pairs (± {pspan(ses)} paired SE; a "
        f"second training seed moves the round by {pct(second)})",
    ]


def row_sim_fit(f: Data, short: bool) -> list[str]:
    if short:
        return [
            "Simulated users' fit to held-out MovieLens ratings",
            f"`make bench-sim-fit` ({minutes(f['wall_s'])})",
            sim_fit_headline(f),
        ]
    return [
        "the hidden user models' held-out fit to MovieLens (watch log-loss and AUC, "
        "next-item NDCG@10 vs SASRec)",
        "`make bench-sim-fit`",
        f"see [Simulated A/B tests](simulation.md) ({minutes(f['wall_s'])})",
    ]


def row_offline(e: Data) -> list[str]:
    rows = model_rows(e)
    best = picked(rows)
    n = rows[best]["metrics", "full", "NDCG@10"]
    sas = rows["sasrec"]["metrics", "full", "NDCG@10"]
    what = {"hybrid": "SID + next-item head", "item": "next-item head", "sid": "SID score"}
    return [
        "Offline quality, MovieLens-100k, full ranking",
        "`recloop eval` ([command](docs/benchmarks.md))",
        f"OneRec ({what.get(rows[best]['scoring'], rows[best]['scoring'])}, picked on "
        f"validation) NDCG@10 **{n:.4f}** vs SASRec {sas:.4f} (**{ratio(n / sas)}**), "
        f"popularity {rows['pop']['metrics', 'full', 'NDCG@10']:.4f}",
    ]


def row_serving(s: Data, short: bool) -> list[str]:
    levels = serving_levels(s)
    at = " / ".join(levels)
    arms = len(s["batched", levels[0], "arm_batches"])
    rps = per_level(s, "batched", "rps", lambda x: num(x))
    vs_ping = per_level(s, "batched", "vs_ping_rps", lambda x: num(x, 2))
    p99 = per_level(s, "batched", "p99_ms", lambda x: num(x, 0))
    top = levels[-1]
    promo = s["promotion"]
    if short:
        return [
            f"Serving over HTTP: the served seed checkpoint, beam 32, features from Feast, "
            f"{arms} arms",
            "`make bench-serving`",
            f"**{rps} req/s** at concurrency {at} = **{vs_ping}×** a trivial Serve deployment "
            f"in the same run; p99 {p99} ms; batching "
            f"**{ratio(s['batched', top, 'vs_unbatched_rps'])}** unbatched at {top}; "
            f"{promo['errors']} errors through a promotion under load",
        ]
    p50 = per_level(s, "batched", "p50_ms", lambda x: num(x, 0))
    errors = sum(s["batched", c, "errors"] for c in levels)
    batches = " / ".join(
        span(
            [
                s["batched", c, "arm_batches", a, "mean_batch"]
                for a in s["batched", c, "arm_batches"]
            ],
            lambda x: num(x, 2),
        )
        for c in levels
    )
    unbatched = per_level(s, "unbatched", "rps", lambda x: num(x))
    gain = per_level(s, "batched", "vs_unbatched_rps", lambda x: ratio(x))
    pairs = s.get(("batched", top, "vs_unbatched_rps_pairs"))
    pairs_note = (
        f" (on and off are the same replicas, the batch limit switched in place; medians of "
        f"{len(pairs)} alternating pairs, {span(list(pairs), ratio)} at {top})"
        if pairs is not None
        else ""
    )
    ping = per_level(s, "baseline_ping", "rps", lambda x: num(x, 0))
    router = " / ".join(num(replica_cores(s, c, True)[0], 2) for c in levels)
    recs = " / ".join(span(replica_cores(s, c, False), lambda x: num(x, 2)) for c in levels)
    inline = per_level(s, "inline", "rps", lambda x: num(x))
    inline_vs = per_level(s, "inline", "vs_split_rps", lambda x: ratio(x))
    inline_cores = max(v for c in levels for v in s["inline", c, "replica_cpu_cores"].raw.values())
    rss = s["rss_mb"]
    rss_rec = [rss[k] for k in rss if not k.startswith("Router")]
    rss_router = [rss[k] for k in rss if k.startswith("Router")]
    return [
        "Serving over HTTP, the served seed checkpoint, beam 32, histories from Feast, "
        f"{arms} arms × 1 replica (0.25 CPU, 1 thread), continuous batching, no access log, "
        "dashboard off",
        "`.venv/bin/python -m benchmarks.serving --checkpoint DIR` (`make bench-serving` "
        "takes the newest seed)",
        f"concurrency {at}, batching on: p50 {p50} ms, p99 {p99} ms, **{rps} req/s**, "
        f"{errors} errors; mean batch per arm {batches}; batching off: {unbatched} req/s, so "
        f"batching gives **{gain}**{pairs_note}. Trivial `/ping` deployment in the same run: "
        f"{ping} req/s "
        "(this machine's speed varies from day to day: compare the ratios), so the service "
        f"reaches **{vs_ping}** of Serve's HTTP floor. CPU per replica over the load (cores): "
        f"router {router}, each recommender {recs}. The arms' engines inside the router's "
        f"process (`serve.topology: inline`): {inline} req/s, **{inline_vs}** the split "
        f"topology (one process, {num(inline_cores, 2)} cores at most: its GIL serialises "
        f"every arm). Promotion under load (c={promo['concurrency']}): **{promo['errors']} "
        f"errors** of {promo['requests']}, new version in responses "
        f"{num(promo['new_version_after_s'])} s after the command, p99 "
        f"{num(promo['p99_ms'], 0)} ms over the promotion's window. RSS: recommender replica "
        f"{span(rss_rec, lambda x: num(x, 0))} MB, router "
        f"{span(rss_router, lambda x: num(x, 0))} MB",
    ]


def row_beam(b: Data, short: bool) -> list[str]:
    served, default = beam_models(b)
    cfg = served["config"]
    first = served["rows", 0]
    mfu = [r["mfu"] for r in served["rows"]]
    kv = [r["kv_cache_speedup"] for r in served["rows"]]
    if short:
        return [
            f"Beam search, served seed checkpoint, beam {cfg['beam']}, "
            f"{word(b['torch_threads'])} thread",
            "`make bench-beam`",
            f"batch {first['batch']} p50 **{num(first['p50_ms'])} ms**; KV cache "
            f"{span(kv, lambda x: num(x))}× the cache-less reference; "
            f"{span(mfu, lambda x: num(x, 2))} of the same run's matmul peak (active FLOPs)",
        ]
    dcfg = default["config"]
    p50 = [num(r["p50_ms"]) for r in served["rows"]]
    return [
        f"Beam search (the fast decode path), beam {cfg['beam']}, M={cfg['session_len']}, "
        f"L={cfg['levels']}, {cfg['items']} items, {b['torch_threads']} torch thread, "
        f"{first['searches_timed']} timed searches per batch",
        "`make bench-beam` (`.venv/bin/python -m benchmarks.beam_search`)",
        f"**served seed checkpoint** (dim {cfg['dim']}, K {cfg['codebook_size']}, "
        f"{cfg['experts']} experts top-{cfg['top_k']}, {mparams(cfg['params', 'total'])} "
        f"params, {mparams(cfg['params', 'active'])} active): batch "
        f"{by_batch(served, 'batch', str)} p50 **{p50[0]}** / {' / '.join(p50[1:])} ms (p99 "
        f"{by_batch(served, 'p99_ms', num)}), "
        f"{by_batch(served, 'requests_per_s', lambda x: num(x, 0))} req/s; KV cache vs the "
        "cache-less reference "
        f"**{by_batch(served, 'kv_cache_speedup', lambda x: ratio(x, 1))}**; MFU (active "
        f"FLOPs) **{by_batch(served, 'mfu', lambda x: num(x, 3))}** of the "
        f"{b['torch_threads']}-thread fp32 matmul peak ({num(b['matmul_peak_gflops'])} "
        f"GFLOP/s, best of {len(b['matmul_peak_runs_gflops'])} in the same run). **Default "
        f"config** (dim {dcfg['dim']}, K {dcfg['codebook_size']}, random weights): p50 "
        f"{by_batch(default, 'p50_ms', num)} ms, KV cache "
        f"{by_batch(default, 'kv_cache_speedup', lambda x: ratio(x, 1))}, MFU "
        f"{by_batch(default, 'mfu', lambda x: num(x, 3))}",
    ]


def row_ingest(i: Data, short: bool) -> list[str]:
    kp = ingest_backlog(i, "kafka-python")
    live = i["live", "kafka-python"]
    runs = kp["records_per_s_runs"]
    raw = kp["raw_consumer_records_per_s_runs"]
    if short:
        return [
            f"Ingestion: Kafka → Feast + lake, exactly once, {count(kp['records'])}-record backlog",
            "`make bench-ingest`",
            f"**{count(kp['records_per_s'])} records/s** (median of {word(len(runs))} drains) "
            f"= **{ratio(kp['ratio_to_raw_consumer'])}** a bare consumer of the same records "
            "with the same fetch settings in the same run (pairs "
            f"{span(kp['ratio_to_raw_consumer_pairs'], ratio)}: the bare "
            f"reads vary {ratio(max(raw) / min(raw), 1)}); live feature freshness p50 "
            f"**{num(live['freshness_p50_ms'], 0)} ms**, p99 {num(live['freshness_p99_ms'], 0)} ms",
        ]
    cf = ingest_backlog(i, "confluent")
    cl = i["live", "confluent"]
    claim(i["clients", 0] == "kafka-python", "kafka-python is the default")
    faster = "its ingestor is the faster of the two"
    if cf["records_per_s"] > kp["records_per_s"]:
        faster = "confluent-kafka's ingestor was the faster in this run"
    return [
        f"Ingestor into Feast (SQLite online store) + lake, 3 partitions, sessions of "
        f"{i['session_len']} items",
        "`make bench-ingest`",
        f"backlog of {count(kp['records'])} records ({count(kp['sessions_in_lake'])} sessions), "
        "each Kafka client (`ingest.client`) against a bare consumer of the same client "
        f"polling and fetching as the ingestor does ({_consumer(i)}), "
        f"{word(len(runs))} drains each right after its bare read (own lake and consumer group "
        "each time), both clocks from the first record in hand to the last record read / "
        "committed with its features pushed: **kafka-python (the default): "
        f"{count(kp['records_per_s'])} records/s** median (drains "
        f"{', '.join(count(x) for x in runs)}; {count(kp['sessions_per_s'])} sessions/s; "
        f"{kp['flushes']} adaptive flushes of up to {count(kp['flush_records_max'])} records) "
        f"against a median {count(kp['raw_consumer_records_per_s'])} records/s bare "
        f"({', '.join(count(x) for x in raw)}), **{ratio(kp['ratio_to_raw_consumer'])}** "
        f"(pairs {', '.join(num(x, 2) for x in kp['ratio_to_raw_consumer_pairs'])}); "
        f"**confluent-kafka: {count(cf['records_per_s'])} records/s** against "
        f"{count(cf['raw_consumer_records_per_s'])} bare (librdkafka has fetched the whole "
        "backlog before the first record is in hand), "
        f"{ratio(cf['ratio_to_raw_consumer'], 3)}.{_ingest_phases(kp)} The drains vary by "
        f"{ratio(max(runs) / min(runs), 1)} and the bare reads by "
        f"{ratio(max(raw) / min(raw), 1)} within one run on this machine. kafka-python stays "
        f"the default ({faster}). Live at "
        f"{num(live['records_per_s_offered'], 0)} records/s offered: feature freshness (Kafka "
        "timestamp of a session's newest record → its user's history in the online store) "
        f"**kafka-python p50 {num(live['freshness_p50_ms'], 0)} ms, p99 "
        f"{num(live['freshness_p99_ms'], 0)} ms**; confluent-kafka p50 "
        f"{num(cl['freshness_p50_ms'], 0)} ms, p99 {num(cl['freshness_p99_ms'], 0)} ms; "
        f"flushes of ~{num(live['flush_records_p50'], 0)} records taking "
        f"{span([live['flush_p50_s'] * 1e3, cl['flush_p50_s'] * 1e3], lambda x: num(x, 0))} ms "
        f"(p50); committed-offset lag p50 {live['lag_records_p50']} / {cl['lag_records_p50']} "
        "records",
    ]


def _consumer(i: Data) -> str:
    """The poll and fetch settings the ingestor and the bare consumers shared."""
    c = i["consumer"]
    return (
        f"{count(c['max_poll_records'])} records per poll, "
        f"{num(c['fetch_partition_bytes'] / 2**20, 0)} MB per partition per fetch"
    )


def _ingest_phases(kp: Data) -> str:
    """Where the median kafka-python drain's time went (runs before the phases were
    measured say nothing)."""
    ph = kp.get("phase_s")
    if not ph:
        return ""
    flush = {k.split(":", 1)[1]: ph[k] for k in ph if k.startswith("flush:")}
    top = sorted(flush, key=lambda k: -flush[k])[:3]
    gc_s = kp.get("gc_s")
    collector = (
        f"; the cyclic collector {num(gc_s['gen0'] + gc_s['gen1'] + gc_s['gen2'], 2)} s of it all"
        if gc_s
        else ""
    )
    return (
        f" Where the median kafka-python drain's time went (`phase_s`): polls that "
        f"returned records (fetch and parse) {num(ph['poll'], 2)} s, "
        + (f"waits for a fetch {num(ph['poll:starved'], 2)} s, " if ph.get("poll:starved") else "")
        + f"folding the "
        f"records into sessions {num(ph['fold'], 2)} s, flushes "
        f"{num(sum(flush.values()), 2)} s (most: "
        + ", ".join(f"{k} {num(flush[k], 2)} s" for k in top)
        + f"){collector}."
    )


def row_faults(f: Data, short: bool) -> list[str]:
    records = list(f["faults"])
    claim(all(r["survived"] for r in records), "every fault survived")
    moved = [r for r in records if r.get("produced") is not None]
    claim(all(r["produced"] == r["landed"] for r in moved), "nothing lost or duplicated")
    broker = fault(f, "test_broker_killed")
    command = f"`python -m benchmarks.faults` ({minutes(f['seconds'])})"
    if short:
        return [
            "Faults: broker kill -9, ingestor and trainer kills, replica kill under load, a "
            "locked Feast store, corrupt weights, fuzzed events and HTTP",
            command,
            f"every fault survived, nothing lost or duplicated ({broker['produced']} events "
            f"produced = {broker['landed']} landed across a broker kill)",
        ]
    multi = fault(f, "test_multinode")
    replica = fault(f, "replica_killed")
    warm = fault(f, "warm_trainer_actor_killed")
    feast = fault(f, "feature_store_away")
    return [
        "Fault injection: broker kill -9, ingestor kills, trainer kills (a Ray Train rank, "
        "the warm trainer actor), an ingestor kill on a multi-node cluster, replica kill "
        "under load, Feast store locked, corrupt and NaN checkpoints, fuzzed events and HTTP",
        command,
        f"every fault survived; broker kill: **{broker['produced']} events produced = "
        f"{broker['landed']} landed**, recovered in {num(broker['recovery_s'])} s; "
        f"multi-node: {multi['landed']} of {multi['produced']} sessions landed; replica kill: "
        f"{pct(replica['success_ratio'], 0)} of requests answered, new replica in "
        f"{num(replica['recovery_s'])} s; warm trainer actor killed mid-round: resumed from "
        f"its checkpoint with weights equal to an unbroken round's, "
        f"{num(warm['recovery_s'])} s; Feast store locked: "
        f"{pct(feast['success_ratio'], 0)} of requests answered; see "
        "[Faults survived](operations.md#faults-survived)",
    ]


# ---------------------------------------------------------------------------- README


def demo_whole_run(swt: dict[str, Any], learning: list[str]) -> str:
    """The whole run's verdicts against control, in words: which learning arms win, and
    any other arm (popularity) that does."""
    wins = [a for a in learning if swt[a]["verdict"] == "win"]
    said = (
        "no learning arm beats control significantly"
        if not wins
        else " and ".join(
            f"{a} beats control ({spct(swt[a]['rel_lift'])}, {pval(swt[a]['p_value'])})"
            for a in wins
        )
    )
    others = [a for a in swt if a not in learning and swt[a]["verdict"] == "win"]
    if others:
        said += "; " + ", ".join(
            f"{a} does ({spct(swt[a]['rel_lift'])}, {pval(swt[a]['p_value'])})" for a in others
        )
    return said


@block("readme-demo", "demo/summary.json")
def readme_demo(s: Data) -> str:
    return blocks(
        para(
            f"The latest run ({s['run', 'sessions']} sessions in {demo_traffic_min(s)} of "
            "traffic; [report](benchmarks/results/demo/report.html), data in "
            "`benchmarks/results/demo/summary.json`, written by `recloop demo --out "
            "benchmarks/results/demo`):"
        ),
        demo_quote(s, verdicts=False),
    )


@block(
    "readme-demo-reading", "demo/summary.json", "training.json", "ipa_1pct.json", "ipa_5pct.json"
)
def readme_demo_reading(s: Data, t: Data, one: Data, five: Data) -> str:
    learning = demo_learning_arms(s)
    rounds = [s["rounds_decided", a] for a in learning]
    times = [r["round_s"] for a in learning for r in s["training", a]]
    last = demo_last_tenth(s)
    best = max(learning, key=last.__getitem__)
    swt = {a: demo_verdict(s, a) for a in last if a != s["run", "control"]}
    gains = [swt[a]["rel_lift"] for a in learning]
    half = statistics.mean((swt[a]["ci", 1] - swt[a]["ci", 0]) / 2 for a in learning)
    shares = {a["name"]: a["share"] for a in s["run", "arms"]}
    longer = [comparison(t["ab", "comparisons"], "online", "swt")]
    longer += [comparison(d["ab", "comparisons"], "online", "swt") for d in (one, five)]
    longer_text = ", ".join(f"{spct(c['rel_lift'], 0)} ({pval(c['p_value'])})" for c in longer)
    return para(
        f"Each learning arm decided {span(rounds, str)} rounds of {span(times, num)} s, and "
        f"feedback reached serving {num(s['feedback_to_serving', 'p50_s'])} s (p50) after it "
        f"was given. In the last tenth of the traffic the best learning arm ({best}, "
        f"{num(last[best])} s per session) is {ahead(last[best], last['popularity'])} "
        f"popularity ({num(last['popularity'])} s) and "
        f"{ahead(last[best], last[s['run', 'control']])} the frozen "
        f"seed ({num(last[s['run', 'control']])} s). Over the whole run "
        f"{demo_whole_run(swt, learning)}; {share(shares[best])} of MovieLens's users per arm "
        f"resolves about ±{pct(half, 0)} (the learning arms' lift: "
        f"{', '.join(spct(g) for g in gains)}). "
        "Longer runs with fewer arms, `make bench-training` and `make bench-ipa` (1% and 5% "
        f"mirrored), put online learning against the frozen seed at {longer_text}.",
    )


@block(
    "headline",
    "training.json",
    "ipa_1pct.json",
    "ipa_5pct.json",
    "ipa_offline.json",
    "sim_fit_ml100k.json",
    "eval_compare_ml100k_hybrid.json",
    "serving.json",
    "beam_search.json",
    "ingest.json",
    "faults.json",
    "loop_offline.json",
)
def headline(
    t: Data,
    one: Data,
    five: Data,
    o: Data,
    f: Data,
    e: Data,
    s: Data,
    b: Data,
    i: Data,
    fa: Data,
    lo: Data,
) -> str:
    return table(
        ["what", "command", "figure"],
        [
            row_loop_offline(lo, short=True),
            row_training(t, short=True),
            row_ipa(one, five, short=True),
            row_ipa_offline(o, short=True),
            row_sim_fit(f, short=True),
            row_offline(e),
            row_serving(s, short=True),
            row_beam(b, short=True),
            row_ingest(i, short=True),
            row_faults(fa, short=True),
        ],
    )


# ---------------------------------------------------------------------------- docs/benchmarks.md


@block(
    "benchmarks",
    "demo/summary.json",
    "simulator.json",
    "ingest.json",
    "training.json",
    "ipa_1pct.json",
    "ipa_5pct.json",
    "ipa_offline.json",
    "faults.json",
    "ab_sanity.json",
    "sim_fit_ml100k.json",
    "kafka_throughput.json",
    "beam_search.json",
    "serving.json",
    "loop_offline.json",
)
def benchmarks(
    d: Data,
    sim: Data,
    i: Data,
    t: Data,
    one: Data,
    five: Data,
    o: Data,
    fa: Data,
    ab: Data,
    f: Data,
    k: Data,
    b: Data,
    s: Data,
    lo: Data,
) -> str:
    learning = demo_learning_arms(d)
    times = [r["round_s"] for a in learning for r in d["training", a]]
    lat = d["serving", "latency_ms"]
    last = demo_last_tenth(d)
    best = max(learning, key=last.__getitem__)
    swt = [c for c in d["verdict"] if c["metric"] == "swt"]
    first = swt[0]
    vs = f"{first['arm']} {spct(first['rel_lift'])} {ci(first['ci'])} ({pval(first['p_value'])})"
    vs += "".join(f", {c['arm']} {spct(c['rel_lift'])} ({pval(c['p_value'])})" for c in swt[1:])
    demo = [
        f"The main job: {word(len(d['run', 'arms']))} arms (frozen, popularity following its "
        f"clicks, online, online-ipa at {pct(d['run', 'dpo_fraction'], 0)} mirrored) through "
        "the whole loop, MovieLens, sequential simulated users, one virtual day at 240×",
        "`recloop demo --out benchmarks/results/demo` (`make demo` writes to `.recloop/reports/`)",
        f"**{d['run', 'sessions']} sessions** in {demo_traffic_min(d)} of traffic at "
        f"{num(d['serving', 'requests_per_s'])} req/s; "
        f"**{' and '.join(str(d['rounds_decided', a]) for a in learning)} rounds** per "
        f"learning arm of {span(times, num)} s, feedback-to-serving "
        f"**p50 {num(d['feedback_to_serving', 'p50_s'])} s**, client p50 / p99 "
        f"{num(lat['p50'], 0)} / {num(lat['p99'], 0)} ms (p99 during rounds "
        f"**{ratio(d['serving', 'by_rounds', 'p99_ratio'])}** between); swt vs control: {vs}; "
        f"last tenth: {best} {num(last[best])} s vs popularity {num(last['popularity'])} s; "
        "see [The demo](demo.md)",
    ]
    simulator = [
        "Traffic simulator against a stub server that keeps up (real HTTP, hidden model + "
        f"oracle per session, {sim['session_size']} `Interaction`s per session to Kafka with "
        f"acks=all), MovieLens users, concurrency {sim['concurrency']}, {sim['sessions']} "
        "sessions",
        "`make bench-simulator`",
        f"sequential hidden users: **{num(sim['simulator', 'requests_per_s'], 0)} requests/s, "
        f"{num(sim['simulator', 'events_per_s'], 0)} events/s** offered (acked), "
        f"{sim['simulator', 'failed']} failed; a plain aiohttp client against the same stub: "
        f"{num(sim['raw_requests_per_s'], 0)} requests/s, so the simulator runs at "
        f"**{ratio(sim['ratio_simulator_to_raw'], 3)}** the bare HTTP loop (the hidden model, "
        "the oracle and event encoding are the cost)",
    ]
    aa = [
        f"A/A over {ab['aa_summary', 'runs']} seeds and model vs popularity / random under "
        "each hidden user model, MovieLens, whole stack",
        "`make bench-ab`",
        f"see [Simulated A/B tests](simulation.md) ({minutes(ab['wall_s'])})",
    ]
    kafka = [
        f"Kafka event helpers vs raw kafka-python, Kafka {k['machine', 'kafka']}, "
        f"{k['events'] / 1000:.0f} k events of ~{k['avg_event_bytes']:.0f} B, "
        f"{k['partitions']} partitions",
        "`make bench-kafka`",
        f"produce {k['produce_helper_per_s'] / 1000:.1f} k/s vs "
        f"{k['produce_raw_per_s'] / 1000:.1f} k/s raw (**{ratio(k['produce_ratio'])}**: "
        f"contract check + JSON); consume {k['consume_helper_per_s'] / 1000:.1f} k/s vs "
        f"{k['consume_raw_per_s'] / 1000:.1f} k/s raw (**{ratio(k['consume_ratio'])}**: decode "
        "+ validate), commit per batch",
    ]
    return table(
        ["benchmark", "command", "result"],
        [
            demo,
            simulator,
            row_ingest(i, short=False),
            row_loop_offline(lo, short=False),
            row_training(t, short=False),
            row_ipa(one, five, short=False),
            row_ipa_offline(o, short=False),
            row_faults(fa, short=False),
            aa,
            row_sim_fit(f, short=False),
            kafka,
            row_beam(b, short=False),
            row_serving(s, short=False),
        ],
    )


@block("eval-hybrid", "eval_compare_ml100k_hybrid.json")
def eval_hybrid(e: Data) -> str:
    rows = model_rows(e)
    best = picked(rows)
    seen: set[str] = set()
    out = []
    for model, row in rows.items():
        m = row["metrics"]
        label, n10, val = eval_label(model, row), f"{m['full', 'NDCG@10']:.4f}", ""
        val = f"{m['val_full', 'NDCG@10']:.4f}"
        if model == best:
            label, n10, val = f"**{label}** (picked: best val)", f"**{n10}**", f"**{val}**"
        out.append(
            [
                label,
                f"{m['full', 'HR@10']:.4f}",
                n10,
                f"{m['full', 'HR@20']:.4f}",
                f"{m['full', 'NDCG@20']:.4f}",
                f"{m['sampled', 'HR@10']:.3f}",
                f"{m['sampled', 'NDCG@10']:.3f}",
                val,
                f"{m['full_by_tie', 'tied', 'NDCG@10']:.4f} / "
                f"{m['full_by_tie', 'untied', 'NDCG@10']:.4f}",
                train_cell(model, row, seen),
            ]
        )
    header = ["model (one run, seed 0)", "HR@10", "NDCG@10", "HR@20", "NDCG@20"]
    header += ["sampled HR@10", "sampled NDCG@10", "val N@10", "NDCG@10 tied / untied", "train"]
    return table(header, out)


@block("eval-hybrid-findings", "eval_compare_ml100k_hybrid.json")
def eval_hybrid_findings(e: Data) -> str:
    rows = model_rows(e)
    best = picked(rows)
    n = {m: rows[m]["metrics", "full", "NDCG@10"] for m in rows}
    hr = {m: rows[m]["metrics", "full", "HR@10"] for m in rows}
    word_best = SCORINGS.get(rows[best]["scoring"], rows[best]["scoring"])
    tie = paired(e, best, "sasrec")
    claim(tie["ci95"][0] < 0 < tie["ci95"][1], "OneRec and SASRec tie")
    claim(best == "onerec:hybrid", "the hybrid is the picked row")
    over_sid = paired(e, best, "onerec")
    claim(over_sid["ci95"][0] > 0, "the hybrid beats the SID score alone")
    claim(n["onerec"] < n["sasrec"], "the SID score alone trails SASRec")
    claim(n["onerec"] < n["onerec:item"] < n[best], "the next-item head lands between the two")
    drop = paired(e, "onerec@d2", "onerec")
    claim(drop["diff"] < 0, "dropout lowers the SID score")
    d2_val = max(
        (m for m in rows if m.startswith("onerec@d2")),
        key=lambda m: rows[m]["metrics", "val_full", "NDCG@10"],
    )
    claim(d2_val != "onerec@d2:item", "validation does not pick the dropout model's head")
    slower = rows["onerec@d2"]["train_seconds"] / rows["onerec"]["train_seconds"] - 1
    dropout = rows["onerec@d2"]["options", "dropout"]
    command = (
        f"`.venv/bin/python -m pipelines.analysis.paired benchmarks/results/{e.file} {best} sasrec`"
    )
    return bullets(
        f"**OneRec reaches SASRec, as a tie.** The {word_best} scores {n[best]:.4f} NDCG@10 "
        f"against SASRec's {n['sasrec']:.4f}, and {hr[best]:.4f} HR@10 against "
        f"{hr['sasrec']:.4f}. The paired bootstrap over the {tie['users']} test users "
        f"({command}) gives {paired_text(tie)} on NDCG@10: no difference either way.",
        f"**The hybrid beats the SID score alone**: {paired_text(over_sid)}, ahead in "
        f"{pct(over_sid['p_a_ahead'], 0)} of resamples. The SID score alone still trails "
        f"SASRec by {pct(1 - n['onerec'] / n['sasrec'], 0)}. The next-item head alone lands "
        "between the two.",
        f"**Dropout {dropout} does not help.** It was the lead of an encoder-only "
        f"diagnostic, found on test. Here the SID score drops to {n['onerec@d2']:.4f} "
        f"({paired_text(drop)}) and training takes {pct(slower, 0)} longer. Its next-item "
        f"head scores {n['onerec@d2:item']:.4f} on test, but validation does not pick it, so "
        "it is not the figure.",
        "**Serving.** An A/B arm with `scoring: hybrid` re-ranks every beam's items by the "
        "same blend (see [Serving](serving.md)).",
    )


@block("eval-ties", "eval_compare_ml100k_hybrid.json")
def eval_ties(e: Data) -> str:
    rows = model_rows(e)
    best = picked(rows)
    tie = rows["sasrec"]["metrics", "full_by_tie"]
    ours = rows[best]["metrics", "full_by_tie"]
    sas_t, sas_u = tie["tied", "NDCG@10"], tie["untied", "NDCG@10"]
    our_t, our_u = ours["tied", "NDCG@10"], ours["untied", "NDCG@10"]
    claim(sas_t > sas_u and our_t > our_u, "both gain from tied targets")
    lead = "leads" if our_t > sas_t else "trails"
    gap = our_u / sas_u - 1
    return para(
        "**Where the gap is.** MovieLens-100k records ratings to the second, and many of a "
        "user's ratings share their second. The loaders keep such ties in the file's order "
        "(`--ties item` orders them by item id instead, the order of older runs, inside "
        "which the next item has a higher id: a model with item-id embeddings at its output "
        "can learn that order, a model that spells items as semantic IDs hardly can). "
        "`recloop eval` reports full ranking split by whether the test target shares its "
        f"timestamp with the item before it ({pct(tie['tied_share'], 0)} of the test "
        f"targets do). SASRec scores {sas_t:.4f} NDCG@10 on tied targets and {sas_u:.4f} on "
        f"untied ones; the picked OneRec {our_t:.4f} and {our_u:.4f}: it {lead} SASRec on "
        f"tied targets, and the gap is on untied ones ({spct(gap, 0)}).",
    )


ONEPIECE = {
    "onerec": "OneRec, beam only (SID score)",
    "onerec:infonce": "OneRec, InfoNCE head only",
    "onerec:cascade": "OneRec, cascade (the beam's proposals re-scored by the head)",
    "onerec@nobce": "OneRec without the BCE term",
}


def onepiece_label(model: str, row: Data) -> str:
    if model in ONEPIECE:
        return ONEPIECE[model]
    if model in ("pop", "sasrec"):
        return eval_label(model, row)
    opts = row["options"]
    if "latent_steps" in opts:
        return f"OneRec, latent reasoning K = {opts['latent_steps']}"
    if "anchors" in opts:
        return f"OneRec, context engineering (descriptors + {opts['anchors']} anchors)"
    return model


def onerec_trained(rows: dict[str, Data]) -> list[str]:
    return [m for m in rows if m.startswith("onerec") and ":" not in m]


@block("onepiece", "onepiece_ml100k.json")
def onepiece(e: Data) -> str:
    rows = model_rows(e)
    best = max(onerec_trained(rows), key=lambda m: rows[m]["metrics", "full", "NDCG@10"])
    seen: set[str] = set()
    out = []
    for model, row in rows.items():
        m = row["metrics"]
        n10 = f"{m['full', 'NDCG@10']:.4f}"
        first_row = trained_model(model) not in seen
        train = train_cell(model, row, seen).split(" (")[0]
        if model == "pop" or not first_row:
            epochs = "—" if model == "pop" else ""
        elif model == "sasrec":
            ep, _ = best_epoch(row)
            epochs = f"{row['train_info', 'epochs_run']} (best {ep})"
        else:
            ep, val = best_epoch(row)
            epochs = f"{row['train_info', 'epochs_run']} (best {ep}, {val:.4f})"
        out.append(
            [
                onepiece_label(model, row),
                f"{m['full', 'HR@10']:.4f}",
                f"**{n10}**" if model == best else n10,
                f"{m['sampled', 'HR@10']:.3f}",
                f"{m['sampled', 'NDCG@10']:.3f}",
                train,
                num(row["eval_seconds"]),
                epochs,
            ]
        )
    header = ["model", "HR@10", "NDCG@10", "sampled HR@10", "sampled NDCG@10", "train"]
    return table([*header, "eval s", "epochs (best, val NDCG@10)"], out)


@block("onepiece-findings", "onepiece_ml100k.json", "eval_compare_ml100k_hybrid.json")
def onepiece_findings(e: Data, hybrid: Data) -> str:
    import numpy as np

    from pipelines.analysis.paired import per_user

    rows = model_rows(e)
    n = {m: rows[m]["metrics", "full", "NDCG@10"] for m in rows}
    train = {m: rows[m]["train_seconds"] for m in rows}
    dec = {m: rows[m]["eval_seconds"] for m in rows}
    val = {m: best_epoch(rows[m])[1] for m in onerec_trained(rows)}
    best_ep = [best_epoch(rows[m])[0] for m in onerec_trained(rows)]
    base = "onerec"
    ideas = ["onerec:infonce", "onerec:cascade", "onerec@k1", "onerec@k2", "onerec@ctx"]
    claim(all(n[m] < n[base] for m in ideas), "none of OnePiece's ideas helps")
    claim(
        max(onerec_trained(rows), key=n.__getitem__) == "onerec@nobce",
        "dropping the BCE term gives the best OneRec",
    )
    claim(all(val[m] > val[base] for m in ("onerec@k1", "onerec@k2")), "K raises validation")
    ranks = model_rows(hybrid)["onerec"]["test_ranks"].raw
    per = per_user(ranks, 10)["NDCG@10"]
    se = float(per.std(ddof=1) / np.sqrt(len(per)))
    spread = max(val.values()) - min(val.values())
    clearly = [m for m in ideas + ["onerec@nobce"] if abs(n[m] - n[base]) > 2 * se]
    claim(clearly == ["onerec:infonce"], "only the InfoNCE-only row is clearly worse")
    users = rows[base]["metrics", "full", "users"]
    more = [train[m] / train[base] - 1 for m in ("onerec@k1", "onerec@k2")]
    slower = [dec[m] / dec[base] - 1 for m in ("onerec@k1", "onerec@k2")]
    return blocks(
        "In plain words, none of OnePiece's ideas helps here:",
        bullets(
            f"**Cascade.** The InfoNCE head alone ranks worse than the SID score "
            f"({n['onerec:infonce']:.4f} vs {n[base]:.4f}). Blending it into beam search's "
            f"proposals lowers NDCG@10 a little ({n['onerec:cascade']:.4f}).",
            f"**BCE term.** Dropping it gives the best OneRec of the run "
            f"({n['onerec@nobce']:.4f} vs {n[base]:.4f}).",
            f"**Latent reasoning.** K = 1 and K = 2 raise validation NDCG@10 slightly "
            f"({val['onerec@k1']:.4f} and {val['onerec@k2']:.4f} vs {val[base]:.4f}) but not "
            f"test ({n['onerec@k1']:.4f} and {n['onerec@k2']:.4f}). They cost "
            f"{pct(more[0], 0)} and {pct(more[1], 0)} more training time, and "
            f"{pspan(slower, 0)} more decode time.",
            f"**Context engineering.** Time, demographics and genre anchors give "
            f"{n['onerec@ctx']:.4f}, and cost {pct(train['onerec@ctx'] / train[base] - 1, 0)} "
            "more training time.",
        ),
        "How much to trust these figures:",
        bullets(
            f"This is one seed on {users} test users. The standard error of a test NDCG@10 "
            f"here is about {se:.3f} (from OneRec's per-user ranks in the run above), and "
            f"the validation scores of the OneRec rows lie within {spread:.3f} of each other. "
            "So only the InfoNCE-only row is clearly worse; the other differences are within "
            "noise.",
            f"The early stops came at epoch {span(best_ep, str)} of a "
            f"{rows[base]['options', 'epochs']}-epoch cosine schedule, so every OneRec here is "
            "under-trained.",
            "The cascade weight and the BCE weight were not tuned; the test split was not used "
            "to choose them.",
        ),
    )


ABLATIONS = {
    "moe_session5": "MoE decoder (top-2 of 4), session-wise M = 5 (the seed then)",
    "dense_session5": "dense FFN, equal active parameters, M = 5",
    "moe_point1": "MoE, point-wise M = 1",
}


@block("ablations", "ablations_ml100k.json")
def ablations(a: Data) -> str:
    v = a["variants"]
    rows = []
    for key in v:
        p = v[key, "params"]
        params = mparams(p["total"])
        if p["active"] != p["total"]:
            params += f" ({mparams(p['active'])})"
        rows.append(
            [
                ABLATIONS.get(key, key),
                params,
                f"{v[key, 'test_full', 'HR@10']:.4f}",
                f"{v[key, 'test_full', 'NDCG@10']:.4f}",
                f"{v[key, 'wall_s']:.0f} s",
            ]
        )
    beams = a["beam_retrieval"]
    users = {beams[k, "users"] for k in beams}
    beam_rows = [
        [
            f"beam {k}",
            f"{beams[k, 'HR@5']:.3f}",
            f"{beams[k, 'HR@10']:.3f}",
            f"{beams[k, 'NDCG@10']:.3f}",
            f"{num(beams[k, 'seconds'])} s",
        ]
        for k in sorted(beams.keys(), key=int)
    ]
    seed = v["moe_session5", "test_full", "NDCG@10"]
    better = [v[k, "test_full", "NDCG@10"] / seed - 1 for k in ("dense_session5", "moe_point1")]
    claim(all(x > 0 for x in better), "the dense and point-wise models are better")
    half = v["moe_point1", "wall_s"] / v["moe_session5", "wall_s"]
    widest = max(beams.keys(), key=int)
    claim(
        beams[widest, "HR@10"] == max(beams[k, "HR@10"] for k in beams),
        "the widest beam retrieves the most",
    )
    return blocks(
        table(["variant", "params (active)", "HR@10", "NDCG@10", "train"], rows),
        table(
            [
                "generative retrieval (first items of the beam's sessions, "
                f"{', '.join(map(str, sorted(users)))} test users)",
                "HR@5",
                "HR@10",
                "NDCG@10",
                "time",
            ],
            beam_rows,
        ),
        para(
            "At this data size and budget neither the experts nor the session-wise target pay "
            "off: the dense decoder and the point-wise model are "
            f"{pspan(better, 0)} better on NDCG@10 (differences of this size are within "
            f"what a seed change moves on {v['moe_session5', 'test_full', 'users']} test "
            f"users; not yet measured), and point-wise trains in {ratio(half)} the time. "
            "A wider beam retrieves more of the targets that full ranking finds (beam "
            f"{widest} reaches HR@10 {beams[widest, 'HR@10']:.2f} against "
            f"{v['moe_session5', 'test_full', 'HR@10']:.2f} for full ranking).",
        ),
    )


@block("catalogue-scale", "scale.json")
def catalogue_scale(sc: Data) -> str:
    """OneRec / SASRec per catalogue size: training, peak memory, evaluation."""
    st = sc["settings"]
    by = {(r["model"], r["items"]): r for r in sc["runs"]}
    sizes = sorted({r["items"] for r in sc["runs"]})

    def cell(r: Any, key: str, unit: str, d: int = 1) -> str:
        if r is None:
            return "not run"
        if r.get("timed_out"):
            return f"stopped at {num(st['timeout_min'], 0)} min"
        if r.get("failed") is not None:
            return f"failed (exit {r['failed']})"
        return f"{num(r[key], d)}{unit}"

    def rel(size: int, key: str, variant: str = "onerec_over_sasrec") -> str:
        x = sc[variant, str(size)].get(key)
        return f"**{ratio(x, 1)}**" if x is not None else "–"

    disjoint = "onerec_disjoint_over_sasrec" in sc.keys()

    lines = [
        f"`make bench-scale` (synthetic catalogues; {count(st['users'])} users × "
        f"{st['per_user']} interactions, {word(st['epochs'])} epoch, {st['threads']} thread, "
        f"{st['eval_users']} test users ranked against the whole catalogue; each run in its "
        "own process; OneRec's codebook sized to the catalogue; this run's sizes "
        f"{', '.join(count(x) for x in sizes)}):",
        "",
        "| items | OneRec train (s) | SASRec train (s) | OneRec / SASRec | peak RSS OneRec / "
        "SASRec (MB) | ratio above the imports | eval per user OneRec / SASRec (ms) |"
        + (" OneRec disjoint train (s) | its ratio | NDCG@10 OneRec / disjoint / SASRec |"
           if disjoint else ""),
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if disjoint else ""),
    ]  # fmt: skip
    for size in sizes:
        a, b = by.get(("onerec", size)), by.get(("sasrec", size))
        line = (
            f"| {count(size)} | {cell(a, 'train_s', '')} | {cell(b, 'train_s', '')} | "
            f"{rel(size, 'train_s')} | {cell(a, 'peak_rss_mb', '', 0)} / "
            f"{cell(b, 'peak_rss_mb', '', 0)} | {rel(size, 'peak_above_imports_mb')} | "
            f"{cell(a, 'eval_ms_per_user', '', 1)} / {cell(b, 'eval_ms_per_user', '', 1)} |"
        )
        if disjoint:
            c = by.get(("onerec-disjoint", size))
            line += (
                f" {cell(c, 'train_s', '')} | "
                f"{rel(size, 'train_s', 'onerec_disjoint_over_sasrec')} | "
                f"{cell(a, 'ndcg@10', '', 3)} / {cell(c, 'ndcg@10', '', 3)} / "
                f"{cell(b, 'ndcg@10', '', 3)} |"
            )
        lines.append(line)
    if disjoint:
        m = next(r["stride"] for r in sc["runs"] if r["model"] == "onerec-disjoint")
        lines += [
            "",
            "OneRec's own epoch (`recloop eval`'s stride 1) starts a session after every "
            f"item, so with sessions of {m} items it trains on about {word(m)} times as many "
            "next-item targets as there are interactions; *disjoint* cuts each sequence "
            "into sessions that do not overlap (stride = session length), so every "
            "interaction is a target once per epoch, as in SASRec's. The NDCG@10 columns "
            "check that each model ranks (one epoch on synthetic data, not a quality "
            "figure).",
        ]
    return "\n".join(lines)


@block("scaling", "scaling_ml100k.json")
def scaling(sc: Data) -> str:
    size = [r for r in sc["runs"] if r["kind"] == "size"]
    data = [r for r in sc["runs"] if r["kind"] == "data"]
    dims = [r["dim"] for r in size]
    params = [r["non_embedding_params"] for r in size]
    fractions = " and ".join(share(r["data_fraction"]) for r in data)
    fits = sc["fits"]

    def cells(kind: str) -> list[str]:
        best = max(("sid_loss", "infonce_loss"), key=lambda k: fits[kind, k, "r2"])
        return [
            f"α = {num(fits[kind, k, 'alpha'], 3)}, "
            + (
                f"**R² {num(fits[kind, k, 'r2'], 2)}**"
                if k == best
                else f"R² {num(fits[kind, k, 'r2'], 2)}"
            )
            for k in ("sid_loss", "infonce_loss")
        ]

    data_dims = {r["dim"] for r in data}
    return blocks(
        para(
            "`.venv/bin/recloop scaling --data ../shared/data/ml-100k --epochs "
            f"{sc['epochs']} --threads 1 --out benchmarks/results/scaling_ml100k.json` "
            f"({minutes(sc['wall_s'])}; the plot is `benchmarks/results/scaling_ml100k.png`): "
            f"OneRec with the joint objective at {word(len(size))} widths (dim "
            f"{min(dims)}–{max(dims)}, {min(params) / 1e3:.0f} k–{max(params) / 1e3:.0f} k "
            f"non-embedding parameters) on all the data, and the widest on {fractions} of the "
            f"users, {sc['epochs']} epochs each with sessions every {sc['stride']} items; the "
            "losses are held out on each user's validation item.",
        ),
        table(
            ["fit (L = A·X^−α)", "SID loss", "InfoNCE loss"],
            [
                [
                    "against non-embedding parameters "
                    f"({fits['params', 'sid_loss', 'points']} widths)",
                    *cells("params"),
                ],
                [
                    f"against training tokens ({fits['tokens', 'sid_loss', 'points']} data "
                    f"fractions, dim {', '.join(map(str, sorted(data_dims)))})",
                    *cells("tokens"),
                ],
            ],
        ),
    )


@block("scaling-reading", "scaling_ml100k.json")
def scaling_reading(sc: Data) -> str:
    size = [r for r in sc["runs"] if r["kind"] == "size"]
    fits = sc["fits"]
    middle, widest = size[1:-1], size[-1]
    flat = [r["infonce_loss"] for r in middle]
    claim(widest["infonce_loss"] > max(flat), "the InfoNCE loss rises at the widest model")
    claim(
        fits["tokens", "infonce_loss", "r2"] > fits["params", "infonce_loss", "r2"],
        "the InfoNCE loss follows the data, not the size",
    )
    return para(
        "Here the SID loss comes close against size and data "
        f"({num(fits['params', 'sid_loss', 'r2'], 2)} and "
        f"{num(fits['tokens', 'sid_loss', 'r2'], 2)}). The InfoNCE loss follows the data "
        f"closely but not the size: at {sc['epochs']} epochs its held-out loss is flat from "
        f"{middle[0]['non_embedding_params'] / 1e3:.0f} k to "
        f"{middle[-1]['non_embedding_params'] / 1e3:.0f} k parameters and rises at "
        f"{widest['non_embedding_params'] / 1e3:.0f} k. The widths are small and so is the "
        "catalogue, so the exponents are small "
        f"({num(fits['params', 'sid_loss', 'alpha'], 3)} for the SID loss against size).",
    )


# ---------------------------------------------------------------------------- docs/demo.md


def _cpus(machine: str) -> str:
    m = re.search(r"(\d+) CPUs", machine)
    return f"{m.group(1)}-core machine" if m else "machine"


@block("demo-latest", "demo/summary.json")
def demo_latest(s: Data) -> str:
    return blocks(
        para(
            "**The latest demo run** (`recloop demo --out benchmarks/results/demo`, on a "
            f"{_cpus(s['run', 'machine'])}, no GPU; its seed model the newest `recloop "
            f"pretrain` checkpoint under `.recloop/models/seed` "
            f"(`{Path(s['run', 'seed_checkpoint']).name}`: the demo pre-trains a 3-minute one "
            "only when there is none); sequential simulated users; one-epoch rounds; "
            "the report is in [`benchmarks/results/demo/`](results/demo/report.html), "
            "re-rendered by `python -m pipelines.analysis.report "
            f"benchmarks/results/demo/summary.json`): {s['run', 'sessions']} sessions in "
            f"{demo_traffic_min(s)} of traffic at {num(s['serving', 'requests_per_s'])} "
            "requests/s.",
        ),
        demo_quote(s, verdicts=True),
    )


@block("demo-findings", "demo/summary.json")
def demo_findings(s: Data) -> str:
    over = s["online_over_time"]
    control = s["run", "control"]
    learning = demo_learning_arms(s)
    gap0 = {a: over[a, 0, "oracle_gap"] for a in over}
    claim(min(gap0, key=gap0.__getitem__) == "popularity", "popularity starts closest")
    pop_last = over["popularity", -1, "oracle_gap"]
    claim(pop_last > gap0["popularity"], "popularity drifts away from the oracle")
    last = demo_last_tenth(s)
    best = max(learning, key=last.__getitem__)
    rest = [a for a in learning if a != best] + [control]
    others = ", ".join(f"{a} {num(last[a])} s" for a in rest)
    swt = {a: demo_verdict(s, a) for a in over if a != control}
    half = statistics.mean((swt[a]["ci", 1] - swt[a]["ci", 0]) / 2 for a in learning)
    shares = {a["name"]: a["share"] for a in s["run", "arms"]}
    training = {a: list(s["training", a]) for a in learning}
    statuses = [r["status"] for a in learning for r in training[a]]
    times = [r["round_s"] for a in learning for r in training[a]]
    per_version = s["feedback_to_serving", "per_version"]
    slowest = max(per_version, key=lambda v: v["feedback_to_serving_s"])
    claim(slowest["round"] == 1, "the first promotions took the longest")
    ingest = s["ingest", "timeline", -1]
    lat, rounds = s["serving", "latency_ms"], s["serving", "by_rounds"]
    promo = rounds["during_promotions", "p99"]
    between = rounds["between_rounds", "p99"]
    promo_text = (
        f"{num(promo, 0)} ms, no worse than between rounds: a replica no longer spends its "
        "load of a new version building the tokenizer's trie in Python beside its requests"
        if promo <= between
        else f"{num(promo, 0)} ms against {num(between, 0)} ms between rounds: in this run "
        "promotions still cost the requests of the replicas that load the new version"
    )
    dpo = s["dpo", "totals"]
    rounds_text = f"{learning[0]} decided {s['rounds_decided', learning[0]]} rounds"
    rounds_text += "".join(f" and {a} {s['rounds_decided', a]}" for a in learning[1:])
    gap_others = pspan([g for a, g in gap0.items() if a != "popularity"], 0)
    return bullets(
        "**Against the baseline.** Popularity starts closest to the oracle (gap "
        f"{pct(gap0['popularity'])} in the first tenth, the other arms "
        f"{gap_others}) "
        f"and drifts away as the users' taste moves ({pct(pop_last)} in the last tenth: "
        "recounting its own arm's clicks keeps it on the items it already shows). In the "
        f"last tenth the best learning arm, {best}, reaches {num(last[best])} s per session "
        f"against popularity's {num(last['popularity'])} s ({others}). Over the whole run "
        f"{demo_whole_run(swt, learning)}: the learning arms' lift is "
        f"{pspan([swt[a]['rel_lift'] for a in learning])} here, and "
        f"{share(shares[best])} of MovieLens's users per arm resolves about ±{pct(half, 0)}. "
        "More sessions per user buy little: users are the units, and with "
        f"{share(shares[best])} of the users per arm the between-user variance sets the "
        "interval's floor.",
        "**Training.** A round starts once 40 new high-quality sessions of the arm are in "
        f"the lake: {rounds_text} "
        f"({statuses.count('promoted')} promoted, {statuses.count('rejected')} rejected by "
        f"the gate), each taking {span(times, num)} s; the popularity arm recounted "
        f"{s['rounds_decided', 'popularity']} times.",
        "**Freshness.** Each promotion's feedback-to-serving delay (the newest feedback "
        "record it learned from → promoted) is p50 "
        f"**{num(s['feedback_to_serving', 'p50_s'])} s** over the {len(per_version)} "
        f"promotions, at most {num(slowest['feedback_to_serving_s'])} s (the first "
        "promotions). The ingestor's feature freshness is p50 "
        f"{num(ingest['freshness_p50_ms'] / 1e3)} s; its p99 over the run's records "
        f"({num(ingest['freshness_p99_ms'] / 1e3)} s) is set by the first records, which "
        "waited for the consumer group to form.",
        f"**Latency.** Client-side p50 {num(lat['p50'], 0)} ms, p99 {num(lat['p99'], 0)} ms. "
        f"Requests sent while a round ran ({rounds['rounds']} rounds with the recounts): p99 "
        f"{num(rounds['during_rounds', 'p99'], 0)} ms; between rounds: "
        f"{num(rounds['between_rounds', 'p99'], 0)} ms (**{ratio(rounds['p99_ratio'])}**). Of "
        "the requests during rounds, those sent while a version was being promoted had p99 "
        f"{promo_text}. Training, "
        "the ingestor and the sampler run in Linux's SCHED_IDLE class at nice 10 "
        "(`priority.background_policy`), so they take only the cycles the replicas leave. "
        "Rounds of the two arms take turns.",
        f"**DPO.** The sampler emitted {dpo['emitted']} pairs from the online-ipa arm's "
        f"mirrored requests ({num(dpo['cpu_s_per_request'], 2)} s CPU per request).",
    )


# ---------------------------------------------------------------------------- docs/training.md


@block("ab-designs", "bias.json")
def ab_designs(b: Data) -> str:
    """The symbiosis-bias table: per design, the estimate against the truth over seeds."""
    a, other = b["arms", "a"], b["arms", "b"]
    rows, unbiased, biased = [], [], []
    for design in b["designs"]:
        d = b["designs", design]
        bias = d["bias"]
        rows.append(
            [
                f"`{design}`",
                spct(d["estimate", "mean"]),
                spct(d["truth", "mean"]),
                f"{_fixed(100 * bias['mean'], 1, sign=True)} "
                f"[{_fixed(100 * bias['lo'], 1, sign=True)}, "
                f"{_fixed(100 * bias['hi'], 1, sign=True)}]",
                _fixed(100 * d["estimate_sd"], 1),
                _fixed(100 * d["rmse"], 1),
            ]
        )
        (unbiased if d["unbiased"] else biased).append(f"`{design}`")
    sd = {design: b["designs", design, "estimate_sd"] for design in b["designs"]}
    steadiest = min(sd, key=sd.get)
    noisiest = max(sd, key=sd.get)
    under = [f"`{x}`" for x in b["designs"] if b["designs", x, "bias", "hi"] < 0]
    over = [f"`{x}`" for x in b["designs"] if b["designs", x, "bias", "lo"] > 0]
    rmse = {design: b["designs", design, "rmse"] for design in b["designs"]}
    closest = min(rmse, key=rmse.get)

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:-1]) + f" and {xs[-1]}" if len(xs) > 1 else xs[0]

    if not biased:
        first = "Within their 95% intervals over the seeds, every design is unbiased."
    elif not unbiased:
        first = "No design is unbiased: every 95% interval over the seeds excludes zero."
    else:
        first = (
            f"Within their 95% intervals over the seeds, {names(unbiased)} "
            f"{'is' if len(unbiased) == 1 else 'are'} unbiased; {names(biased)} "
            f"{'is' if len(biased) == 1 else 'are'} not."
        )
    sides = []
    if under:
        sides.append(f"{names(under)} underestimate{'s' if len(under) == 1 else ''} the truth")
    if over:
        sides.append(f"{names(over)} overestimate{'s' if len(over) == 1 else ''} it")
    verdict = (
        first
        + (f" {'; '.join(sides)}." if sides else "")
        + f" The closest to the truth is `{closest}` (RMSE {_fixed(100 * rmse[closest], 1)} "
        f"points). The steadiest estimate is `{steadiest}`'s (SD "
        f"{_fixed(100 * sd[steadiest], 1)} points over the seeds), the noisiest "
        f"`{noisiest}`'s ({_fixed(100 * sd[noisiest], 1)})."
    )
    return blocks(
        para(
            f"**The last run** (`make bench-bias`, `benchmarks/results/bias.json`, "
            f"{minutes(b['wall_s'])}): `{a}` against `{other}`, `{a}` on "
            f"{pct(b['share'], 0)} of {b['users']} simulated users ({b['steps']} sessions "
            f"each, {len(b['seeds'])} traffic seeds); the metric is {b['metric']}. Lifts "
            "of A over B, mean of the seeds; bias = estimate − truth in percentage points, "
            "with its 95% interval over the seeds; SD: the estimate's over the seeds; RMSE: "
            "against the truth, in points:"
        ),
        table(["design", "estimate", "truth", "bias, points [95% CI]", "SD", "RMSE"], rows),
        para(verdict),
    )


@block("loop-offline", "loop_offline.json")
def loop_offline(o: Data) -> str:
    arms = list(o["lift_all"])
    label = {"control": "control (frozen seed)", "popularity": "popularity (its clicks)"}
    rows = []
    for a in arms:
        if a == "control":
            continue
        over = o["arms", a]
        name = label.get(a, a)
        if over:
            name += (
                " ("
                + ", ".join(f"{k.removeprefix('train.')} {v}" for k, v in over.raw.items())
                + ")"
            )
        elif a == "online":
            name += f" ({o['train', 'reward_weighting']}-weighted)"
        runs_last = o["lift_last", a, "runs"]
        rows.append(
            [
                name,
                f"{spct(o['lift_all', a, 'mean'])} [{spct(o['lift_all', a, 'min'])}]",
                f"{spct(o['lift_last', a, 'mean'])} [{spct(o['lift_last', a, 'min'])}]",
                ", ".join(spct(x, 0) for x in runs_last),
                " → ".join(str(n) for n in (o["runs"][0]["summary"][a]["distinct_items_by_step"])),
            ]
        )
    on, on_min = loop_lift(o, "online")
    pop = loop_lift(o, "popularity")[0]
    ahead = loop_ahead_runs(o, "online", "popularity")
    claim(on > pop and ahead > len(o["seeds"]) / 2, "online overtakes popularity")
    ntp = loop_unweighted(o)
    claim(bool(ntp), "an unweighted arm ran")
    ntp_all = loop_lift(o, ntp[0], "all")[0]
    items = o["runs"][0]["summary"]["online"]["distinct_items_by_step"]
    claim(items[-1] < items[0], "the catalogue served narrows")
    claim(abs(ntp_all) < 0.05, "unweighted rounds leave the seed where it was")
    return blocks(
        para(
            f"**The loop offline** (`make bench-loop-offline`, "
            f"`benchmarks/results/loop_offline.json`, {minutes(o['wall_s'])}): the rounds "
            "above, without Kafka, Ray or Serve. Every arm serves the same "
            f"{o['users']} simulated users ({o['hidden_user_model']}, the demo's drift; the "
            f"demo gives each of its arms that many) {o['steps']} sessions each, "
            f"{num(o['gap_h'], 0)} virtual hours apart; after every {o['chunk']} users an "
            "arm's sessions are committed to its own lake and its round runs (the real "
            "`run_round`: warm trainer, gate, registry promotion; popularity re-counts its "
            f"clicks). The users answer with the same draws in every arm. {len(o['seeds'])} "
            "runs under different traffic seeds, because a learning loop is path-dependent: "
            "what one round learns decides what the next one is shown. Expected session "
            "watch time (the hidden model's, of each served slate) against the frozen seed, "
            "paired over users, mean of the runs [smallest]:",
        ),
        table(
            [
                "arm",
                "whole run",
                "last third",
                "last third, each run",
                "distinct items served by step (first run)",
            ],
            rows,
        ),
        para(
            f"Rounds that weigh every click alike ({ntp[0]}) leave the seed where it was "
            f"({spct(ntp_all)} over the whole run): a 10-second click and a 300-second one "
            "teach them the same, while the users' value is watch time (each item's length "
            "and how much of it they watch). Weighted by watch time, the same rounds move "
            f"the served sessions towards what users watch longest: online ends "
            f"{spct(on)} over the frozen seed (smallest run {spct(on_min)}) against "
            f"popularity's {spct(pop)}, ahead of popularity in {ahead} of "
            f"{len(o['seeds'])} runs. The runs differ widely (each trajectory settles on "
            "its own items), and the catalogue an arm serves narrows round after round "
            f"(online {items[0]} → {items[-1]} distinct items by step in the first run): "
            "exploration that keeps more of the catalogue in play is the next lead.",
        ),
    )


@block("training", "training.json")
def training(t: Data) -> str:
    comps, arms = t["ab", "comparisons"], t["ab", "arms"]
    rows = []
    for arm in arms:
        a = arms[arm]
        if arm == "control":
            rows.append(["control (frozen)", str(a["sessions"]), num(a["swt"]), "", "", ""])
            continue
        swt, vtr, ltr = (comparison(comps, arm, m) for m in ("swt", "vtr", "ltr"))
        lift = spct(swt["rel_lift"])
        rows.append(
            [
                arm,
                str(a["sessions"]),
                num(a["swt"]),
                f"**{lift}** {ci(swt['ci_delta'])}, {pval(swt['p_value'])}: {short_verdict(swt)}",
                f"{spct(vtr['rel_lift'])}, {short_verdict(vtr)}",
                f"{spct(ltr['rel_lift'])}, {short_verdict(ltr)}",
            ]
        )
    expected = comparison(comps, "online", "expected_swt")
    tenths = t["oracle_by_tenth", "tenths"]
    swt_by = {a: [x["swt"] for x in tenths[a]] for a in tenths}
    on, ctl, pop = swt_by["online"], swt_by["control"], swt_by["popularity"]
    first = {a: v[0] for a, v in swt_by.items()}
    claim(max(first, key=first.__getitem__) == "popularity", "popularity starts far ahead")
    claim(pop[-1] < pop[0], "popularity falls")

    def ahead_from(a: list[float], b: list[float]) -> int | None:
        """The tenth from which ``a`` stays ahead of ``b`` to the end (None: it ends behind)."""
        i = len(a)
        while i > 0 and a[i - 1] > b[i - 1]:
            i -= 1
        return i if i < len(a) else None

    def against(other: str, since: int | None, verb: str) -> str:
        if since is None:
            return f"ends behind {other}"
        return f"{verb} {other} from the {ORDINALS[since]} tenth on"

    over_control, over_pop = ahead_from(on, ctl), ahead_from(on, pop)
    last = t["oracle_by_tenth", "last_tenth_swt"]
    rounds = t["rounds"]
    summary = t["round_summary_by_arm", "online"]
    phases = summary["phases_median_s"]
    hq = statistics.median(r["hq_sessions"] for r in rounds)
    holdout = statistics.median(r["gate", "metrics", "holdout"] for r in rounds)
    warm = t["warm_vs_bare"]
    popularity = t["round_summary_by_arm", "popularity"]
    others = [first[a] for a in first if a != "popularity"]
    return blocks(
        table(
            [
                "arm",
                "sessions",
                "swt (s/session)",
                "swt lift [95% CI], p",
                "view rate",
                "like rate",
            ],
            rows,
        ),
        para(
            "The hidden model's expected watch time of the served sessions: online "
            f"{spct(expected['rel_lift'])} ({pval(expected['p_value'])}). Over time "
            "(`oracle_by_tenth` in the JSON): popularity starts far "
            f"ahead ({num(pop[0])} s per session in the first tenth against "
            f"{span(others, num)} s) and falls as the users' taste drifts away from what it "
            f"keeps showing; online {against('control', over_control, 'stays ahead of')} and "
            f"{against('popularity', over_pop, 'is ahead of')}; in the last tenth online "
            f"{num(last['online'])} s, popularity {num(last['popularity'])} s, control "
            f"{num(last['control'])} s.",
        ),
        para(
            f"The rounds: {summary['decided']} rounds of ~{hq:.0f} high-quality sessions (of "
            f"a median {summary['sessions_median']} sessions each; {hq - holdout:.0f} trained, "
            f"{holdout:.0f} held out, {word(warm['epochs'])} epoch), {summary['promoted']} "
            f"promoted and {summary['rejected']} rejected by the gate. A round takes "
            f"**{span([r['round_s'] for r in rounds], num)} s** end to end (median "
            f"{num(summary['round_s_median'])} s; phases, medians: data "
            f"{num(phases['data'], 2)} s{_data_read(summary)}, train "
            f"{num(phases['train'], 2)} s, gate "
            f"{num(phases['gate'], 2)} s, promote {num(phases['promote'], 2)} s through "
            f"Serve's reconfigure, publish {num(phases['publish'], 2)} s). In the same run, "
            "the last round's examples trained again after the traffic: the warm trainer "
            "(checkpoints and counters included) at "
            f"**{num(warm['warm_examples_per_s'], 0)} examples/s**, a bare loop in one process "
            f"at {num(warm['bare_examples_per_s'], 0)} (**{ratio(warm['warm_vs_bare'])}**; "
            f"best of {word(len(warm['all_warm_s']))} each; with one epoch the round's fixed "
            "costs weigh more). Each promotion's feedback-to-serving delay (the newest "
            "feedback record it learned from → promoted) is "
            f"**p50 {num(summary['feedback_to_served_p50_s'])} s**, at most "
            f"{num(summary['feedback_to_served_max_s'])} s; the rounds' cadence is set by the "
            f"{hq:.0f} sessions each waits for, so the serving version's newest feedback, "
            f"sampled every 10 s, was p50 {num(t['feedback_to_serving', 'p50_s'], 0)} s old. "
            f"The popularity arm recounted {popularity['decided']} times (median "
            f"{num(popularity['round_s_median'])} s a round).{_read_paths(t)}",
        ),
    )


def _read_paths(t: Data) -> str:
    """The same-run comparison of a round's read by Ray Data and in process (runs
    before it was measured say nothing)."""
    rp = t.get("read_paths")
    if not rp:
        return ""
    nodes = "one node" if rp["nodes"] == 1 else f"{rp['nodes']} nodes"
    return (
        f" After the traffic, a round's read of {rp['commits_per_read']} commits (the "
        f"rounds' median) on the run's cluster ({nodes}, serving still up): in process "
        f"{num(rp['local_s_median'], 2)} s, through Ray Data {num(rp['ray_s_median'], 2)} s "
        f"(medians of {word(len(rp['ray_s']))}, alternately; the first Ray Data read "
        f"{num(rp['ray_s'][0], 1)} s, its workers starting), which is why "
        "`train.data_engine: auto` reads in process on one node."
    )


# ------------------------------------------------------------------ docs/preference-alignment.md


@block("ipa", "ipa_1pct.json", "ipa_5pct.json", "loop_offline.json", "ipa_offline.json")
def ipa(one: Data, five: Data, lo: Data, o: Data) -> str:
    runs = (one, five)
    rows = []
    for d, name in zip(runs, ("ipa_1pct.json", "ipa_5pct.json"), strict=True):
        vs = {m: comparison(d["ab_vs_online"], "online-ipa", m) for m in ("swt", "vtr", "ltr")}
        on = comparison(d["ab", "comparisons"], "online", "swt")
        ipa_c = comparison(d["ab", "comparisons"], "online-ipa", "swt")
        summary = d["round_summary_by_arm", "online-ipa"]
        on_lift = spct(on["rel_lift"])
        rows.append(
            [
                f"{ipa_fraction(d)} (`{name}`)",
                f"{sum(ipa_pairs(d))} ({summary['decided']} rounds, {summary['rejected']} "
                "rejected by the gate)",
                f"{spct(vs['swt']['rel_lift'])} {ci(vs['swt']['ci_delta'])}, "
                f"{pval(vs['swt']['p_value'])}",
                f"{spct(vs['vtr']['rel_lift'])} ({short_verdict(vs['vtr'])})",
                f"{spct(vs['ltr']['rel_lift'])} ({short_verdict(vs['ltr'])})",
                f"{f'**{on_lift}**' if on['verdict'] == 'win' else on_lift} "
                f"{ci(on['ci_delta'])}, {pval(on['p_value'])}",
                f"{spct(ipa_c['rel_lift'])} {ci(ipa_c['ci_delta'])}, {pval(ipa_c['p_value'])}",
                f"{num(d['dpo_sampler', 'cpu_s_per_request'], 3)} s",
                f"{pct(sampler_share(d), 2)} of a core",
            ]
        )
    header = ["mirrored (`--dpo-fraction`)", "pairs trained (rounds)"]
    header += ["online-ipa vs online: swt [95% CI], p", "vtr", "ltr"]
    header += ["online vs control: swt", "online-ipa vs control: swt"]
    header += ["sampler CPU per request", "sampler CPU share"]

    vs_online = [comparison(d["ab_vs_online"], "online-ipa", "swt") for d in runs]
    vs_control = [comparison(d["ab", "comparisons"], "online", "swt") for d in runs]
    ps = {pval(c["p_value"]) for c in vs_control}

    def overall(cs: list, what: str) -> str:
        """What a set of comparisons says, in words chosen by their verdicts."""
        if all(c["verdict"] == "win" for c in cs):
            return f"{what} pays here"
        if all(c["verdict"] == "loss" for c in cs):
            return f"{what} costs here"
        if not any(c["verdict"] in ("win", "loss") for c in cs):
            return f"{what} shows no significant effect here"
        return f"{what} is not settled by these runs"

    half = statistics.mean((c["ci_delta", 1] - c["ci_delta", 0]) / 2 for c in vs_online)
    mirrored = []
    for d in runs:
        pairs = [p for p in ipa_pairs(d) if p]
        mirrored.append(
            f"at {ipa_fraction(d)} the router mirrored {d['router_dpo_mirror', 'sent']} "
            f"requests, {d['dpo_sampler', 'counts', 'queued']} of them online-ipa's, giving "
            f"{sum(pairs)} pairs over the whole run ({span(pairs, str)} per round)"
        )
    losses = [
        loss["dpo_loss"]
        for d in runs
        for r in d["rounds_by_arm", "online-ipa"]
        for loss in (r.get("losses") or [])
        if loss.get("dpo_loss") is not None
    ]
    rejected = [d["round_summary_by_arm", "online-ipa", "rejected"] for d in runs]
    decided = {d["round_summary_by_arm", "online-ipa", "decided"] for d in runs}
    online_rejected = sum(d["round_summary_by_arm", "online", "rejected"] for d in runs)
    online_decided = {d["round_summary_by_arm", "online", "decided"] for d in runs}
    lasts = [d["oracle_by_tenth", "last_tenth_swt"] for d in runs]
    spread = lo["lift_last", "online", "runs"]
    handled = [
        d["dpo_sampler", "counts", "processed"] + d["dpo_sampler", "counts", "no_reward_model"]
        == d["dpo_sampler", "counts", "queued"]
        for d in runs
    ]
    claim(all(handled), "the sampler processed every request after the first reward model")
    dropped = sum(d["dpo_sampler", "counts", "dropped_full"] for d in runs)
    cpu = [d["dpo_sampler", "cpu_s_per_request"] for d in runs]
    verdicts = " and ".join(
        f"{spct(c['rel_lift'])} at {ipa_fraction(d)} ({pval(c['p_value'])})"
        for c, d in zip(vs_online, runs, strict=True)
    )
    near_log2 = all(0.6 <= x <= 0.8 for x in losses)
    loss_text = (
        f"The DPO loss stayed near log 2 ({span(losses, lambda x: num(x, 2))})"
        if near_log2
        else f"The DPO loss per round ranged {span(losses, lambda x: num(x, 2))} (log 2 = 0.69)"
    )
    second = abs(o["summary", "0/seed+1", "expected_watch_s_lift"])
    off_lifts = [o["summary", k, "expected_watch_s_lift"] for k in ipa_offline_dpo(o)]
    paying = [
        pct(o["summary", k, "requests"] / o["logged_sessions"], 0)
        for k, x in zip(ipa_offline_dpo(o), off_lifts, strict=True)
        if x > second
    ]
    offline_text = (
        "the pairs add a gain beyond a second training seed's noise floor with "
        f"{' and '.join(paying)} of the sessions mirrored"
        if paying
        else "the pairs add no gain beyond a second training seed's noise floor either"
    )
    return blocks(
        table(header, rows),
        para(
            f"{overall(vs_online, 'Preference alignment').capitalize()}: online-ipa vs "
            f"online {verdicts} (the A/B resolves about ±{pct(half, 0)}). "
            f"{overall(vs_control, 'Online learning').capitalize()}: online vs the frozen "
            f"seed {pspan([c['rel_lift'] for c in vs_control], 0)} at "
            f"{' / '.join(sorted(ps))}. The DPO data: {'; '.join(mirrored)}. "
            f"{loss_text}. The gate "
            f"rejected {span(rejected, str)} of online-ipa's "
            f"{'/'.join(map(str, sorted(decided)))} rounds and {online_rejected} of online's "
            f"{'/'.join(map(str, sorted(online_decided)))} over both runs. In the last tenth "
            "online averages "
            + " and ".join(
                f"{num(x['online'])} s ({ipa_fraction(d)})"
                for x, d in zip(lasts, runs, strict=True)
            )
            + ", online-ipa "
            + " and ".join(f"{num(x['online-ipa'])} s" for x in lasts)
            + f", control {span([x['control'] for x in lasts], num)} s. One run of two "
            "learning arms cannot tell DPO's effect from the spread of trajectories: a "
            "learning loop is path-dependent, and `make bench-loop-offline` finds the same "
            f"recipe ending anywhere from {spct(min(spread), 0)} to {spct(max(spread), 0)} "
            "over the frozen seed across traffic seeds. Offline and paired on the same "
            f"logged sessions (below), {offline_text}. The sampler processed "
            f"every request that arrived after the first reward model and dropped {dropped}; "
            f"its CPU cost is {span(cpu, lambda x: num(x, 2))} s per mirrored request (beam "
            "search over the candidates plus the reward model).",
        ),
        para(
            cuped_note(
                [
                    (f"online-ipa vs online at {ipa_fraction(d)}", c)
                    for c, d in zip(vs_online, runs, strict=True)
                ]
                + [
                    (f"online vs control at {ipa_fraction(d)}", c)
                    for c, d in zip(vs_control, runs, strict=True)
                ]
            )
        ),
    )


def weighting(o: Data) -> str:
    """How the run's rounds weighed their clicked items."""
    w = o.get("reward_weighting", "none")
    return "clicks weighted by watch time" if w == "watch" else "every click alike"


IPA_OFFLINE = {
    "seed": "the seed, not fine-tuned",
    "0": "the round without DPO",
    "0/seed+1": "the round without DPO, another training seed",
}


@block("ipa-offline", "ipa_offline.json")
def ipa_offline(o: Data) -> str:
    rm = o["reward_model", "auc"]
    rows = []
    keys = [k for k in o["summary"] if k in IPA_OFFLINE]
    for ratio in ipa_offline_dpo(o):
        keys += [ratio] + [k for k in ipa_offline_dpo(o, True) if k == f"{ratio}/1"]
    per = o["pairs_per_request"]
    for n, k in enumerate(keys):
        s = o["summary", k]
        if k in IPA_OFFLINE:
            label = IPA_OFFLINE[k]
        elif k.endswith("/1"):
            label = f"+ DPO, {pct(float(k[:-2]), 0)}, one pair per request"
        else:
            label = f"+ DPO, {pct(float(k), 0)}"
            label += (
                f" of the logged sessions mirrored, up to {per} pairs per request"
                if n == len(IPA_OFFLINE)
                else f", up to {per} pairs per request"
            )
        base = k == "0"
        rows.append(
            [
                label,
                "—" if k == "seed" else str(s["pairs"]),
                num(s["expected_watch_s"]),
                "—" if base else lift_se(o, k),
                num(s["reward"]),
                "—" if base else lift_se(o, k, "reward"),
            ]
        )
    per_user = o["logged_sessions"] / o["train_users"]
    return blocks(
        para(
            "**Offline, paired** (`make bench-ipa-offline`, "
            "`benchmarks/results/ipa_offline.json`): the effect the A/B cannot see. The seed "
            f"(`{Path(o['checkpoint']).name}`) serves {per_user:.0f} sessions to each of "
            f"{o['train_users']} training users, the hidden user model "
            f"({o['hidden_user_model']}, the simulator's default) answers "
            f"({o['logged_sessions']} logged sessions), a reward model is fitted on them "
            f"(held-out AUC view {num(rm['vtr'], 2)}, like {num(rm['ltr'], 2)}, follow "
            f"{num(rm['wtr'], 2)}), and pairs are mined from the training users as the "
            f"sampler does ({o['candidates']} candidates; the best against the worst, the "
            f"second best against the second worst, and so on, up to {o['pairs_per_request']} "
            "pairs per mirrored request). By the hidden model the chosen session is the "
            f"better one for {ipa_offline_truth(o)}. Each variant fine-tunes the seed with "
            f"the round's worker (the rounds' defaults: {word(o['epochs'])} epoch, batch 64, "
            f"lr 5e-4, {weighting(o)}) on the same high-quality sessions; only the pairs "
            "differ. Scored on "
            f"{o['heldout_users']} held-out users by the hidden model's expected watch time "
            "(the ground truth the reward model estimates) and by the reward model:",
        ),
        table(
            [
                "variant",
                "pairs",
                "expected watch s (hidden model)",
                "vs the round without DPO (± paired SE)",
                "reward model",
                "vs the round without DPO",
            ],
            rows,
        ),
    )


@block("ipa-offline-epochs", "ipa_offline.json")
def ipa_offline_epochs(o: Data) -> str:
    su = o["summary"]
    round_gain = su["0", "expected_watch_s"] / su["seed", "expected_watch_s"] - 1
    second = abs(su["0/seed+1", "expected_watch_s_lift"])
    claim(round_gain > 0.1, "the round itself lifts the seed")

    def moves(keys: list[str]) -> str:
        lifts = [su[k, "expected_watch_s_lift"] for k in keys]
        beyond = [spct(x) for x in lifts if abs(x) > second]
        shares = " / ".join(pct(su[k, "requests"] / o["logged_sessions"], 0) for k in keys)
        text = (
            ", ".join(spct(x) for x in lifts)
            + f" with {shares} of the sessions mirrored "
            + f"({' / '.join(str(su[k, 'pairs']) for k in keys)} pairs)"
        )
        if not beyond:
            return text + ", none of it beyond the noise floor"
        return text + f"; beyond the noise floor: {', '.join(beyond)}"

    one = ipa_offline_dpo(o, True)
    one_text = f"; with one pair per request (as the sampler mined before): {moves(one)}"
    return para(
        f"The round itself ({word(o['epochs'])} epoch, {weighting(o)}) lifts the seed's "
        f"expected watch time by {spct(round_gain)} on the held-out users. DPO on top of "
        f"it, up to {o['pairs_per_request']} pairs per mirrored request, moves expected "
        f"watch time by {moves(ipa_offline_dpo(o))}{one_text if one else ''}. The noise "
        f"floor is the {pct(second)} a second training seed moves the round (the paired SE "
        "does not include it). The pairs' log-probabilities are taken without dropout, as "
        "the reference's are, so a pair's log-ratio starts at 0. OneRec reports +4.04% max "
        "session watch time offline for IPA over its base model and +1.68% watch time "
        "online.",
    )


# ---------------------------------------------------------------------------- docs/simulation.md


@block("sim-fit", "sim_fit_ml100k.json")
def sim_fit(f: Data) -> str:
    kinds = f["kinds"]
    default = f["default"]
    order = [default, *(k for k in kinds if k != default)]
    best = f["best_by"]

    def cell(kind: str, key: str, value: float, d: int = 3) -> str:
        text = num(value, d)
        return f"**{text}**" if best.get(key) == kind else text

    rows = [
        [
            f"{k} (default)" if k == default else k,
            cell(k, "watch_logloss", kinds[k, "watch_logloss"]),
            cell(k, "watch_auc", kinds[k, "watch_auc"]),
            num(kinds[k, "like_auc"], 3),
            cell(k, "next_item_NDCG@10", kinds[k, "next_item", "NDCG@10"]),
        ]
        for k in order
    ]
    pop = f["popularity"]
    rows.append(
        [
            "item popularity",
            "—",
            num(pop["watch_auc"], 3),
            num(pop["like_auc"], 3),
            num(pop["next_item", "NDCG@10"], 3),
        ]
    )
    rows.append(
        ["SASRec on the same prefixes", "—", "—", "—", num(f["sasrec_next_item", "NDCG@10"], 3)]
    )
    header = ["hidden model", "watch log-loss", "watch AUC", "like AUC", "next item NDCG@10"]
    return table(header, rows)


METRIC_WORDS = {"swt": "watch time", "vtr": "views", "ltr": "likes", "wtr": "follows"}


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@block("ab-sanity", "ab_sanity.json")
def ab_sanity(ab: Data) -> str:
    aa = ab["aa"]
    summary = ab["aa_summary"]
    alpha_key = next(k for k in summary if str(k).startswith("significant_at_"))
    alpha = float(alpha_key.removeprefix("significant_at_"))
    seeds = list(aa)
    swts = [aa[s, "comparisons", "b.swt", side] for s in seeds for side in ("control", "arm")]
    lifts = [aa[s, "comparisons", "b.swt", "rel_lift"] for s in seeds]
    covers = all(
        aa[s, "comparisons", "b.swt", "ci_boot", 0]
        <= 0
        <= aa[s, "comparisons", "b.swt", "ci_boot", 1]
        for s in seeds
    )
    claim(covers, "every swt CI covers 0")
    no_diff = sum(
        aa[s, "comparisons", "b.swt", "verdict"] == "no significant difference" for s in seeds
    )
    ps = " / ".join(pval(summary["swt_p_values", s]).removeprefix("p = ") for s in seeds)
    rows = [
        [
            f"A/A, {len(seeds)} seeds (`aa-seed.yaml`)",
            "same seed model on `a` and `b`",
            span(swts, num),
            f"swt lifts {spct(min(lifts))} … {spct(max(lifts))}, p = {ps}; every swt CI covers 0",
            f"no difference in {no_diff} of {len(seeds)} on swt; "
            f"{summary[alpha_key]} of the {summary['cells']} seed × metric cells "
            f"{'reaches' if summary[alpha_key] == 1 else 'reach'} "
            f"p < {alpha:g} ({summary['cells'] * alpha:.0f} expected), "
            f"{summary['ci_covers_zero']} of {summary['cells']} CIs cover 0",
        ]
    ]
    mvb = ab["model_vs_baselines"]
    kinds = [k for k in ("sequential", "static") if k in mvb] + [
        k for k in mvb if k not in ("sequential", "static")
    ]
    throughput, losses = [], []
    for kind in kinds:
        run = mvb[kind]
        comps = run["comparisons"]
        arms = list(dict.fromkeys(k.split(".")[0] for k in comps))
        rows.append(
            [
                f"model vs baselines, {kind} users",
                "control: seed model",
                num(comps[f"{arms[0]}.swt", "control"]),
                "—",
                "—",
            ]
        )
        for arm in [a for a in ("random", "popularity") if a in arms]:

            def c(arm: str, *keys: Any, comps: Data = comps) -> Any:
                return comps[(f"{arm}.{keys[0]}", *keys[1:])]

            swt = c(arm, "swt")
            cell = (
                f"**{spct(swt['rel_lift'])}** [{spct(swt['ci_boot', 0])}, "
                f"{spct(swt['ci_boot', 1])}], {pval(swt['p_value'])}"
            )
            if arm == "popularity":
                cell += (
                    f"; vtr {spct(c(arm, 'vtr', 'rel_lift'))} "
                    f"({pval(c(arm, 'vtr', 'p_value'))}), ltr {spct(c(arm, 'ltr', 'rel_lift'))} "
                    f"({pval(c(arm, 'ltr', 'p_value'))})"
                )
            wins = [m for m in METRIC_WORDS if c(arm, m, "verdict") == "win"]
            lost = [m for m in METRIC_WORDS if c(arm, m, "verdict") == "loss"]
            if len(lost) == len(METRIC_WORDS):
                verdict = "the model wins on every metric"
            elif len(wins) == len(METRIC_WORDS):
                verdict = f"{arm} wins on every metric"
            else:
                parts = []
                if wins:
                    parts.append(f"{arm} wins on {_and([METRIC_WORDS[m] for m in wins])}")
                if lost:
                    said = "on" if wins else "wins on"
                    parts.append(f"the model {said} {_and([METRIC_WORDS[m] for m in lost])}")
                verdict = "; ".join(parts) or "no difference"
            rows.append(["", arm, num(swt["arm"]), cell, verdict])
        throughput.append(run["throughput", "requests_per_s"])
        if "random" in arms:
            losses.append(-comps["random.swt", "rel_lift"])
    runs = [aa[s] for s in seeds] + [mvb[k] for k in kinds]
    produced = {r["delivery", "produced"] for r in runs}
    missing = sum(r["delivery", "missing"] for r in runs)
    dups = sum(r["delivery", "duplicates"] for r in runs)
    claim(all(r["features", "found"] == r["features", "lookups"] for r in runs), "lookups found")
    pop_lift = {k: mvb[k, "comparisons", "popularity.swt", "rel_lift"] for k in kinds}
    claim(all(x > 0 for x in pop_lift.values()), "the seed model loses to most-popular")
    claim(pop_lift["sequential"] < pop_lift["static"], "less so under the sequential users")
    fvr = mvb["sequential", "first_vs_returning"]
    claim(
        fvr["control", "returning_swt"] / fvr["popularity", "returning_swt"]
        < fvr["control", "first_swt"] / fvr["popularity", "first_swt"],
        "the gap is mostly on returning users",
    )
    aa_note = cuped_note([(f"seed {s}", aa[s, "comparisons", "b.swt"]) for s in seeds])
    return blocks(
        table(["run", "arms", "swt (s/session)", "lift vs control [95% CI], p", "verdict"], rows),
        para(f"The A/A runs' comparisons: {aa_note[0].lower()}{aa_note[1:]}") if aa_note else "",
        para(
            "Every run read all its events back from Kafka "
            f"({span(sorted(produced), count)} per run, {missing} missing, {dups} "
            "duplicates), and every feature lookup found its user; the service answered "
            f"{span(throughput, lambda x: num(x, 0))} requests/s in the model-vs-baselines runs.",
        ),
        para(
            "The simulator tells good recommendations from bad ones: random loses to the model "
            f"by {pspan(losses, 0)}. Under both hidden models the frozen seed "
            "model loses to most-popular, less so under the sequential users, who reward what "
            "follows their recent watches. The gap is mostly on returning users: without the "
            "ingestion loop, a frozen model sees the same history at every visit and shows "
            "similar sessions again, which fatigue punishes. Under the sequential users the "
            f"seed model's swt is {num(fvr['control', 'first_swt'], 0)} s on users' first "
            f"sessions of the run and {num(fvr['control', 'returning_swt'], 0)} s on their "
            f"later ones, against {num(fvr['popularity', 'first_swt'], 0)} s / "
            f"{num(fvr['popularity', 'returning_swt'], 0)} s for popularity "
            "(`first_vs_returning` in the results). With the ingestor running, histories are "
            "fresh (see the next section), and the demo measures the learning arms against a "
            "popularity arm whose counts follow its clicks.",
        ),
    )


# ---------------------------------------------------------------------------- docs/operations.md


@block("faults", "faults.json")
def faults(f: Data) -> str:
    from benchmarks.faults import render

    table_text = render(f["faults"].raw).split("\n\n")[0]
    return blocks(f"The last run ({minutes(f['seconds'])}):", table_text)


# ---------------------------------------------------------------------------- the pages


def pages() -> list[Path]:
    """The markdown that may hold blocks: the README and the documentation pages."""
    return [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def _wrap(indent: str, name: str, markdown: str) -> str:
    body = "\n".join(indent + line if line else "" for line in markdown.split("\n"))
    return f"{indent}<!-- figures:{name} -->\n\n{body}\n\n{indent}<!-- /figures:{name} -->"


def render_page(text: str, where: str = "the page") -> tuple[str, list[str]]:
    """``text`` with every block rendered, and the names of its blocks in order."""
    found = MARKER.findall(text)
    opened = OPENING.findall(text)
    if len(found) != len(opened):
        closed = {m[1] for m in found}
        raise FigureError(f"{where}: figures:{[n for n in opened if n not in closed]} not closed")
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        names.append(m["name"])
        return _wrap(m["indent"], m["name"], render_block(m["name"]))

    return MARKER.sub(sub, text), names


def _rel(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def stale() -> list[tuple[Path, str, str, str]]:
    """(page, block, on the page, from the JSON) for every block that differs."""
    out = []
    for page in pages():
        text = page.read_text()
        for m in MARKER.finditer(text):
            want = _wrap(m["indent"], m["name"], render_block(m["name"]))
            if m.group(0) != want:
                out.append((page, m["name"], m.group(0), want))
    return out


def used() -> dict[str, list[Path]]:
    """Which pages hold each block."""
    out: dict[str, list[Path]] = {}
    for page in pages():
        for m in MARKER.finditer(page.read_text()):
            out.setdefault(m["name"], []).append(page)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a block differs")
    args = ap.parse_args(argv)
    try:
        unused = sorted(set(BLOCKS) - set(used()))
        if unused:
            raise FigureError(f"blocks no page holds: {', '.join(unused)}")
        if args.check:
            diffs = stale()
            for page, name, have, want in diffs:
                print(f"{_rel(page)}: figures:{name} differs from its JSON", file=sys.stderr)
                sys.stderr.writelines(
                    difflib.unified_diff(
                        have.splitlines(True), want.splitlines(True), "page", "JSON", n=0
                    )
                )
            if diffs:
                print("run `make figures` to render them", file=sys.stderr)
            return 1 if diffs else 0
        for page in pages():
            text = page.read_text()
            new, names = render_page(text, _rel(page))
            if new != text:
                page.write_text(new)
                print(f"rendered {_rel(page)}: {', '.join(names)}", file=sys.stderr)
    except FigureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
