"""The fault table: runs every test marked ``faults`` and renders what each recorded.

Each fault-injection test (``tests/integration/test_faults.py``, the replica-kill, Feast
and corrupt-checkpoint tests of ``test_serving.py``, the ingestor and trainer kills, the
fuzzers) records what it measured through the ``fault_record`` fixture; pytest writes the
records to ``tests/artifacts/faults.json`` at the end of its session. This command runs
those tests on a stack of their own (the tests bring it up), then saves the records as
``benchmarks/results/faults.json`` and the table as ``benchmarks/results/faults.md``.
A test that fails is a fault not survived: its row says so, and the command exits 1.

    .venv/bin/python -m benchmarks.faults          # ~12 min on a 2-core machine
    .venv/bin/python -m benchmarks.faults --render # the table from the last records only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from recloop.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
RECORDS = PROJECT_ROOT / "tests" / "artifacts" / "faults.json"
COLUMNS = ("fault", "load held", "survived", "bad inputs", "events produced → landed", "recovery")


def _cell(rec: dict[str, Any], col: str) -> str:
    if col == "fault":
        return rec["fault"]
    if col == "load held":
        ratio = rec.get("success_ratio")
        return rec.get("load", "") + (f"; {ratio:.2%} answered" if ratio is not None else "")
    if col == "survived":
        return "yes" if rec.get("survived") else "**no**"
    if col == "bad inputs":
        n = rec.get("bad_inputs")
        return "" if n is None else str(n)
    if col == "events produced → landed":
        if rec.get("produced") is None:
            return ""
        eq = "=" if rec["produced"] == rec.get("landed") else "≠"
        return f"{rec['produced']} {eq} {rec.get('landed')}"
    if col == "recovery":
        r = rec.get("recovery_s")
        return "" if r is None else f"{r:.1f} s"
    raise KeyError(col)


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for rec in records:
        lines.append("| " + " | ".join(_cell(rec, c).replace("|", "/") for c in COLUMNS) + " |")
    lines.append("")
    for i, rec in enumerate(records, 1):
        if rec.get("detail"):
            lines.append(f"{i}. {rec['fault']}: {rec['detail']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only render the last records")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = ap.parse_args(argv)

    rc = 0
    started = time.monotonic()
    if not args.render:
        RECORDS.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "faults", "-p", "no:cacheprovider", "-q"]
        print(f"[faults] {' '.join(cmd[2:] + args.pytest_args)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd + args.pytest_args, cwd=PROJECT_ROOT).returncode
    if not RECORDS.exists():
        print(f"no records at {RECORDS}: did any fault test run?", file=sys.stderr)
        return 1
    records = json.loads(RECORDS.read_text())["faults"]
    if rc != 0:
        records.append(
            {"fault": "(a fault test failed: see the pytest output above)", "survived": False}
        )
    out = {
        "command": "python -m benchmarks.faults",
        "seconds": round(time.monotonic() - started, 1),
        "pytest_exit": rc,
        "faults": records,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render:
        (RESULTS / "faults.json").write_text(json.dumps(out, indent=1) + "\n")
    table = render(records)
    (RESULTS / "faults.md").write_text(table)
    print(table)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
