"""The cluster assets and the code they must agree with.

``infra/k8s/rayservice.yaml`` carries the Serve config KubeRay deploys (``serveConfigV2``):
it is rendered here from the same code as ``recloop serve`` and ``infra/serve/config.yaml``,
for the run file of ``infra/k8s/configmap.yaml`` (the applications load that file, mounted
at ``/etc/recloop/run.yaml``, where they run). After changing the experiment, the serving
settings or the code's Serve layout:

    python -m infra.cluster          # rewrite serveConfigV2 in infra/k8s/rayservice.yaml
    python -m infra.cluster --check  # exit 1 when the file is stale (CI's unit tests check too)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from recloop.config import PROJECT_ROOT, StackConfig, load_config

K8S = PROJECT_ROOT / "infra" / "k8s"
IMAGE_ROOT = "/app"  # where infra/docker/Dockerfile puts the checkout
RUN_FILE = "/etc/recloop/run.yaml"  # where the pods mount the ConfigMap's run.yaml
BEGIN = "  serveConfigV2: |"
END_MARK = "  # end of serveConfigV2"


def manifests(name: str) -> list[dict[str, Any]]:
    """The YAML documents of ``infra/k8s/<name>``."""
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def cluster_run_text() -> str:
    """The run file the pods mount (the ConfigMap's ``run.yaml``)."""
    (doc,) = manifests("configmap.yaml")
    return doc["data"]["run.yaml"]


def local_path(path: str | Path) -> Path:
    """A path inside the image, as it is in this checkout."""
    p = Path(path)
    if p.is_absolute() and p.parts[:2] == ("/", IMAGE_ROOT.strip("/")):
        return PROJECT_ROOT.joinpath(*p.parts[2:])
    return p


def cluster_config(tmp_dir: Path) -> StackConfig:
    """The cluster's run file loaded by recloop's own loader (unknown keys are errors),
    with paths inside the image mapped onto this checkout."""
    path = tmp_dir / "run.yaml"
    path.write_text(cluster_run_text())
    cfg = load_config(path, env={})
    cfg.serve.experiment = local_path(cfg.serve.experiment)
    return cfg


def serve_config_v2(cfg: StackConfig) -> str:
    from serving.app import render_serve_config

    return yaml.safe_dump(render_serve_config(cfg, run_file=RUN_FILE), sort_keys=False)


def render_rayservice(text: str, serve_config: str) -> str:
    """``text`` (rayservice.yaml) with its serveConfigV2 block replaced."""
    lines = text.splitlines()
    try:
        start, end = lines.index(BEGIN), lines.index(END_MARK)
    except ValueError as exc:
        raise ValueError(f"rayservice.yaml lost its {BEGIN!r} ... {END_MARK!r} block") from exc
    body = ["    " + line if line else "" for line in serve_config.splitlines()]
    return "\n".join([*lines[: start + 1], *body, *lines[end:]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m infra.cluster", description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = ap.parse_args(argv)
    path = K8S / "rayservice.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        want = render_rayservice(path.read_text(), serve_config_v2(cluster_config(Path(tmp))))
    if path.read_text() == want:
        print(f"{path.relative_to(PROJECT_ROOT)} is up to date")
        return 0
    if args.check:
        print(f"{path.relative_to(PROJECT_ROOT)} is stale: run python -m infra.cluster")
        return 1
    path.write_text(want)
    print(f"rewrote serveConfigV2 in {path.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
