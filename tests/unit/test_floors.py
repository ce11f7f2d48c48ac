"""The floors of DESIGN.md ("who may import whom"), checked on the source with ``ast``.

    pipelines/ (jobs)   serving/ (Ray Serve)   actors/ (long-lived)
                  \\             |              /
                   recloop/ (ground floor)  +  features/ (the Feast repo)
                                |
                          models/ (pure torch)

Every import statement counts, at module level or inside a function. A known exception
is listed in ``ALLOWED`` with its reason; a new violation fails ``test_no_new_floor_
violations`` and an entry that no longer matches anything fails
``test_every_allowed_exception_still_exists`` (delete it then).

``features/`` is the Feast repo: its store adapter reads ``recloop.config`` only, so it
sits on the ground floor beside ``recloop/`` rather than below it. The ground floor's
own modules therefore do not import it (that would make the two floors import each
other); only the stack launcher and its smoke check, which apply and probe the store,
do. Everything above may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("models", "recloop", "features", "serving", "actors", "pipelines", "benchmarks", "tests")

# Serving's public surface for the other floors: the model registry, what the CLI does
# to the service (deploy, promote, roll back) and the experiment's definition.
SERVING_PUBLIC = ("serving.registry", "serving.control", "serving.experiment")


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


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports (``from a import b`` counts as ``a.b`` when
    ``b`` is a module, else as ``a``)."""
    me = _module(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                package = me.split(".")
                if path.name != "__init__.py":
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if _is_module(full) else base)
    return {n for n in out if n.split(".")[0] in PROJECT}


def _sources(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


# (rule, importer prefix, what it may not import): each returns True for a violation.
RULES = {
    "models/ imports nothing of the project": (
        "models",
        lambda name: not _under(name, "models"),
    ),
    "recloop/ imports only models/ (its CLI and stack launcher aside)": (
        "recloop",
        lambda name: not (_under(name, "recloop") or _under(name, "models")),
    ),
    "features/ (the Feast repo) imports only recloop/": (
        "features",
        lambda name: not (_under(name, "features") or _under(name, "recloop")),
    ),
    "serving/ never imports pipelines/ or actors/": (
        "serving",
        lambda name: _under(name, "pipelines") or _under(name, "actors"),
    ),
    "pipelines/ reach serving only through its registry and control (promote) API": (
        "pipelines",
        lambda name: _under(name, "serving") and not any(_under(name, p) for p in SERVING_PUBLIC),
    ),
    "the DPO sampler loads models from recloop/ and models/, never serving.app or pipelines/": (
        "actors.dpo_sampler",
        lambda name: (
            _under(name, "pipelines")
            or (_under(name, "serving") and name not in ("serving.registry", "serving.experiment"))
        ),
    ),
}

# (importer prefix, imported prefix) -> why it is allowed for now.
ALLOWED = {
    ("recloop.cli", "serving"): "the CLI: deploys, promotes and shows the service",
    ("recloop.cli", "actors"): "the CLI: `recloop simulate` runs the simulation driver",
    ("recloop.stack", "features"): "the stack launcher applies the Feast definitions on `up`",
    ("recloop.smoke", "features"): "the stack's smoke check pushes and reads a Feast row",
    ("recloop.smoke", "serving.smoke"): "the stack's smoke check deploys a smoke app on Serve",
    ("recloop.monitor", "serving"): "the stack monitor (`recloop status`, the dashboard) "
    "reads the registry and the experiment",
    ("recloop.monitor", "actors.ingestor"): "the stack monitor reads the ingestor actor's stats",
    ("recloop.monitor", "pipelines.continuous"): "the stack monitor reads the training rounds' "
    "state and freshness (to move below with the continuous package, issue 22)",
    ("pipelines.demo", "serving.dashboard"): "the demo job prints the dashboard's URL",
}


def _violations() -> dict[tuple[str, str], str]:
    """(importer module, imported module) -> the rule it breaks."""
    out: dict[tuple[str, str], str] = {}
    for rule, (prefix, forbidden) in RULES.items():
        top = prefix.split(".")[0]
        for path in _sources(top):
            importer = _module(path)
            if not _under(importer, prefix):
                continue
            for name in _imports(path):
                if forbidden(name):
                    out.setdefault((importer, name), rule)
    return out


def _allowed(importer: str, name: str) -> bool:
    return any(_under(importer, i) and _under(name, n) for i, n in ALLOWED)


def test_the_import_scan_sees_what_it_must():
    """The scanner itself: function-level imports, ``from pkg import module``."""
    sampler = _imports(ROOT / "actors" / "dpo_sampler.py")
    assert "recloop.inference" in sampler  # imported inside a method
    assert "recloop.config" in sampler  # at module level
    smoke = _imports(ROOT / "recloop" / "smoke.py")
    assert "serving.smoke" in smoke  # `from serving import smoke as app`


def test_no_new_floor_violations():
    new = {k: rule for k, rule in _violations().items() if not _allowed(*k)}
    assert not new, "imports across the floors (DESIGN.md, 'Floors'):\n" + "\n".join(
        f"  {importer} imports {name}: breaks '{rule}'"
        for (importer, name), rule in sorted(new.items())
    )


def test_every_allowed_exception_still_exists():
    found = _violations()
    stale = [
        (i, n)
        for i, n in ALLOWED
        if not any(_under(imp, i) and _under(name, n) for imp, name in found)
    ]
    assert not stale, f"no longer needed, delete from ALLOWED: {stale}"


@pytest.mark.parametrize(
    "module",
    ["recloop.checkpoint", "recloop.context", "recloop.inference", "recloop.data", "models.ranker"],
)
def test_model_loading_sits_below_serving_and_training(module):
    """What serving, the trainer and the DPO sampler load models with imports no floor
    above the ground floor (no exception allowed)."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    above = [n for n in _imports(path) if n.split(".")[0] not in ("recloop", "models")]
    assert not above, f"{module} imports {above}"
