"""pyproject.toml declares what the project imports, at the versions the suite runs.

A module that is only present because another package pulls it in works until that
package drops it; a fresh machine then fails where CI passed. So every third-party
module imported by the runtime packages must be a declared dependency (or an extra's),
and every one imported by tests or benchmarks a dependency or a dev one. Lower bounds
claim what works: they are the releases uv.lock pins (what the suite ran on), so a lock
that moves past a bound's release asks for the bound to move too.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from recloop.config import PROJECT_ROOT

RUNTIME = ("recloop", "actors", "pipelines", "features", "serving", "infra", "models")
DEVELOPMENT = ("tests", "benchmarks")
OWN = set(RUNTIME) | set(DEVELOPMENT)

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())


def _requirements(group: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    if group == "runtime":
        reqs = list(project["dependencies"])
        for extra in project.get("optional-dependencies", {}).values():
            reqs += extra
    else:
        reqs = [r for rs in PYPROJECT["dependency-groups"].values() for r in rs]
    return [Requirement(r) for r in reqs]


def imported_modules(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under ``folders`` (function-level
    imports included) -> the files that import them."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in OWN or top == "__future__" or top in sys.stdlib_module_names:
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(PROJECT_ROOT)))
    return found


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> dict[str, list[str]]:
    dists = md.packages_distributions()
    missing = {}
    for module, files in imported_modules(folders).items():
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        if not names:
            missing[module] = [f"not installed; imported by {sorted(files)[:3]}"]
        elif not names & declared:
            missing[module] = [f"{sorted(names)} imported by {sorted(files)[:3]}"]
    return missing


def test_the_scan_finds_imports_inside_functions_too():
    """The scan is not vacuous: it sees the project's lazy imports (torch and pyarrow
    inside functions, psutil at the top of recloop.procs) and skips the standard library."""
    found = imported_modules(("recloop",))
    assert {"torch", "psutil", "pyarrow"} <= set(found)
    assert "json" not in found and "recloop" not in found


def test_runtime_code_imports_only_declared_dependencies():
    declared = {canonicalize_name(r.name) for r in _requirements("runtime")}
    assert _undeclared(RUNTIME, declared) == {}


def test_tests_and_benchmarks_import_only_declared_dependencies():
    declared = {canonicalize_name(r.name) for g in ("runtime", "dev") for r in _requirements(g)}
    assert _undeclared(DEVELOPMENT, declared) == {}


def test_lower_bounds_are_the_locked_releases():
    """Each declared lower bound is satisfied by uv.lock's release and names the same
    release line (``>=2.15`` for a locked 2.15.x): the bound is what the suite ran on."""
    locked = {canonicalize_name(p["name"]): Version(p["version"]) for p in LOCK["package"]}
    wrong = []
    for req in [*_requirements("runtime"), *_requirements("dev")]:
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            wrong.append(f"{req}: not in uv.lock (run `uv lock`)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req}: the locked {version} does not satisfy it")
        for spec in req.specifier:
            if spec.operator != ">=":
                continue
            bound = Version(spec.version).release
            if version.release[: len(bound)] != bound:
                wrong.append(f"{req}: the suite runs {version}; raise the bound to it")
    assert wrong == []
