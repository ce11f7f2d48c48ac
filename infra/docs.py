"""The CLI reference of the documentation site, generated from the parsers.

    python -m infra.docs            # writes docs/cli.md (done by `make docs`)

Every ``recloop`` command's ``--help``, in the order ``recloop --help`` lists them, at a
fixed width so the page does not depend on the terminal that built it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

from recloop.config import PROJECT_ROOT

OUT = PROJECT_ROOT / "docs" / "cli.md"
WIDTH = "100"


def help_text(argv: list[str]) -> str:
    """What ``recloop ARGV --help`` prints."""
    from recloop.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return buf.getvalue().rstrip()


def commands() -> list[str]:
    from recloop.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    parts = [
        "# CLI reference",
        "",
        "Generated from the parsers by `python -m infra.docs` (`make docs`); "
        "`recloop COMMAND --help` prints the same.",
        "",
        "```text",
        help_text([]),
        "```",
    ]
    for cmd in commands():
        parts += ["", f"## recloop {cmd}", "", "```text", help_text([cmd]), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.write_text(render())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
