"""The floors of DESIGN.md ("who may import whom"), checked on the source with ``ast``
(docs/architecture.md draws them):

    pipelines/ (jobs)      serving/ (Ray Serve)      actors/ (long-lived)
            \\                    |                        /
             └─────────── recloop/ (the ground floor) ───┘
                          /                         \\
              models/ (pure torch)         features/ (the Feast repo)

Every import statement counts, at module level or inside a function, ``from a import b``
as ``a.b`` when ``b`` is a module. The rules:

- ``models/`` and ``features/`` import nothing of the project (the Feast store takes the
  stack's settings as an argument);
- ``recloop/`` imports only ``models/`` and ``features/``; its CLI (``recloop/cli.py``)
  may also reach serving and the actors, through their public APIs only;
- ``serving/`` imports only the floors below; ``actors/`` the floors below and
  ``serving.api``; ``pipelines/`` the floors below, ``serving.api`` and ``actors.api``:
  nothing reaches another upper floor's internals, and nothing imports ``pipelines/``
  (the CLI runs its jobs by module name);
- no import cycle between top-level folders (the CLI's imports aside); ``benchmarks/``,
  ``tests/`` and ``infra/`` (tools) may import any floor and no floor imports them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ("models", "features", "recloop", "serving", "actors", "pipelines")
TOOLS = ("benchmarks", "tests", "infra")
PROJECT = FLOORS + TOOLS
CLI = "recloop.cli"
PUBLIC_API = {"serving": "serving.api", "actors": "actors.api"}

# The floors each floor may import (besides itself and the public APIs listed below).
BELOW: dict[str, tuple[str, ...]] = {
    "models": (),
    "features": (),
    "recloop": ("models", "features"),
    "serving": ("recloop", "models", "features"),
    "actors": ("recloop", "models", "features"),
    "pipelines": ("recloop", "models", "features"),
}
APIS: dict[str, tuple[str, ...]] = {
    "models": (),
    "features": (),
    "recloop": (),
    "serving": (),
    "actors": ("serving.api",),
    "pipelines": ("serving.api", "actors.api"),
}
RULES = {
    "models": "models/ imports nothing of the project",
    "features": "features/ imports nothing of the project (settings come in as arguments)",
    "recloop": "recloop/ imports only models/ and features/",
    "serving": "serving/ imports only recloop/, models/ and features/",
    "actors": "actors/ imports only the floors below and serving.api",
    "pipelines": "pipelines/ imports only the floors below, serving.api and actors.api",
}
CLI_RULE = "the CLI imports the floors below, serving.api and actors.api (jobs by name)"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(source: str, module: str, package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every project import in ``source``, the text of
    ``module`` (``package``: an ``__init__.py``); relative imports resolved."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                pkg = module.split(".") if package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if _is_module(full) else base))
    found = [(line, n) for line, n in out if n.split(".")[0] in PROJECT]
    return list(dict.fromkeys(found))  # `from a import b, c` of one module: once


def broken_rule(importer: str, name: str) -> str | None:
    """The rule ``importer`` importing ``name`` breaks, None when it is allowed."""
    me, it = importer.split(".")[0], name.split(".")[0]
    if me in TOOLS or me == it:
        return None
    if _under(importer, CLI):
        ok = it in BELOW["recloop"] or name in PUBLIC_API.values()
        return None if ok else CLI_RULE
    if it in BELOW[me] or name in APIS[me]:
        return None
    return RULES[me]


def violations(source: str, module: str, package: bool = False) -> list[tuple[int, str, str]]:
    """(line, imported module, rule) for each import of ``source`` that breaks a rule."""
    out = []
    for line, name in imports(source, module, package):
        rule = broken_rule(module, name)
        if rule is not None:
            out.append((line, name, rule))
    return out


def cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected groups of more than one folder in the graph ``edges``."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        if a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {n: reach(n) for n in graph}
    groups = {frozenset(m for m in graph if m in reachable[n] and n in reachable[m]) for n in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def _sources(tops: Iterable[str]) -> list[Path]:
    return sorted(
        p for top in tops for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts
    )


def _scan() -> list[tuple[Path, str, int, str]]:
    """(file, importer, line, imported) of every project import in the repository."""
    out = []
    for path in _sources(PROJECT):
        module = _module(path)
        for line, name in imports(path.read_text(), module, path.name == "__init__.py"):
            out.append((path, module, line, name))
    return out


# --------------------------------------------------------------------------- the checker
def test_the_scanner_sees_every_kind_of_import():
    src = (
        "import models.onerec\n"
        "from recloop import config\n"  # a module: recloop.config
        "from serving.api import promote\n"  # a name: serving.api
        "def f():\n"
        "    from actors import ingestor as ing\n"  # inside a function
        "    from .alignment import ipa\n"  # relative, from pipelines/demo.py
    )
    assert imports(src, "pipelines.demo") == [
        (1, "models.onerec"),
        (2, "recloop.config"),
        (3, "serving.api"),
        (5, "actors.ingestor"),
        (6, "pipelines.alignment.ipa"),
    ]
    assert imports("from . import state\n", "pipelines.continuous", package=True) == [
        (1, "pipelines.continuous.state")
    ]


def test_a_deliberately_bad_import_is_caught():
    bad = (
        "from recloop.config import StackConfig\n"
        "from serving.api import promote\n"
        "\n"
        "def run():\n"
        "    from serving.app import deploy\n"  # serving's internals
        "    from actors.sim.driver import simulate\n"  # the actors' internals
        "    import benchmarks.training\n"  # a tool
    )
    rule = RULES["pipelines"]
    assert violations(bad, "pipelines.analysis.fake") == [
        (5, "serving.app", rule),
        (6, "actors.sim.driver", rule),
        (7, "benchmarks.training", rule),
    ]
    monitor = "def f():\n    from pipelines.continuous import read_rounds\n"
    assert violations(monitor, "recloop.monitor") == [(2, "pipelines.continuous", RULES["recloop"])]


def test_each_floor_gets_its_own_rule():
    assert broken_rule("models.onerec", "recloop.config") == RULES["models"]
    assert broken_rule("features.store", "recloop.config") == RULES["features"]
    assert broken_rule("recloop.monitor", "pipelines.continuous") == RULES["recloop"]
    assert broken_rule("recloop.monitor", "serving.api") == RULES["recloop"]
    assert broken_rule("recloop.stack", "features.store") is None
    assert broken_rule("recloop.cli", "serving.api") is None
    assert broken_rule("recloop.cli", "serving.app") == CLI_RULE
    assert broken_rule("recloop.cli", "pipelines.demo") == CLI_RULE
    assert broken_rule("serving.app", "actors.api") == RULES["serving"]
    assert broken_rule("actors.sim.driver", "serving.api") is None
    assert broken_rule("actors.sim.driver", "pipelines.continuous") == RULES["actors"]
    assert broken_rule("pipelines.demo", "actors.api") is None
    assert broken_rule("pipelines.demo", "actors.ingestor") == RULES["pipelines"]
    assert broken_rule("pipelines.demo", "benchmarks.training") == RULES["pipelines"]
    assert broken_rule("benchmarks.training", "serving.app") is None


def test_a_cycle_between_folders_is_caught():
    assert cycles([("serving", "recloop"), ("recloop", "models")]) == []
    assert cycles([("serving", "recloop"), ("recloop", "features"), ("features", "serving")]) == [
        ["features", "recloop", "serving"]
    ]


# --------------------------------------------------------------------------- the repository
def test_every_import_keeps_to_its_floor():
    found = [
        f"  {path.relative_to(ROOT)}:{line}: {importer} imports {name}: breaks '{rule}'"
        for path, importer, line, name in _scan()
        if (rule := broken_rule(importer, name)) is not None
    ]
    assert not found, "imports across the floors (DESIGN.md, 'Floors'):\n" + "\n".join(found)


def test_no_import_cycle_between_top_level_folders():
    scan = [s for s in _scan() if not _under(s[1], CLI)]
    edges = {(importer.split(".")[0], name.split(".")[0]) for _, importer, _, name in scan}
    found = cycles(edges)
    where = [
        f"  {path.relative_to(ROOT)}:{line}: {importer} imports {name}"
        for group in found
        for path, importer, line, name in scan
        if importer.split(".")[0] in group
        and name.split(".")[0] in group
        and importer.split(".")[0] != name.split(".")[0]
    ]
    assert not found, f"import cycles between folders {found}:\n" + "\n".join(where)


@pytest.mark.parametrize("top", FLOORS)
def test_the_scan_covers_the_floor(top):
    assert _sources([top]), f"no Python file under {top}/"


def test_the_public_apis_exist():
    for module in PUBLIC_API.values():
        assert _is_module(module), module


def test_pipelines_reads_as_the_loop():
    """``pipelines/`` holds one sub-package per stage and the demo job, nothing else."""
    entries = {p.name for p in (ROOT / "pipelines").iterdir() if p.name not in ("__pycache__",)}
    loose = {e for e in entries if e.endswith(".py")} - {"__init__.py", "demo.py"}
    assert not loose, f"modules outside a stage's sub-package: {sorted(loose)}"
    stages = {e for e in entries if (ROOT / "pipelines" / e / "__init__.py").is_file()}
    assert stages == {"offline", "continuous", "alignment", "analysis"}
