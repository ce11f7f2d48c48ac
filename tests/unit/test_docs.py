"""The README stays a door and the documentation site builds without a warning."""

from __future__ import annotations

import re
import subprocess
import sys

from recloop.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    targets = [m.group(1) for m in LINK.finditer(text) if "://" not in m.group(1)]
    assert targets, "the README links to the docs"
    missing = [t for t in targets if not (PROJECT_ROOT / t).exists()]
    assert not missing, missing
    for command in ("make demo", "make test"):
        assert command in text


def test_the_site_builds_strictly(tmp_path):
    """`make docs`: the CLI reference from the parsers, then mkdocs --strict (a broken
    link or anchor, or a page missing from the nav, fails the build)."""
    run = [sys.executable, "-m"]
    subprocess.run([*run, "infra.docs"], cwd=PROJECT_ROOT, check=True, capture_output=True)
    cli = (PROJECT_ROOT / "docs" / "cli.md").read_text()
    assert "## recloop demo" in cli and "--quick" in cli  # a job's own parser is in
    out = subprocess.run(
        [*run, "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "results" / "demo" / "figures" / "online_metrics.png").exists()
