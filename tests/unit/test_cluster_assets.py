"""The cluster assets (infra/k8s, infra/ray, infra/docker) stay consistent with the code:
the Serve config KubeRay deploys is what the code renders, the run file the pods mount
loads with recloop's own loader, import paths import, entrypoints parse, versions match."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from infra import cluster
from recloop.config import _ENV_OVERRIDES, PROJECT_ROOT

K8S = PROJECT_ROOT / "infra" / "k8s"


def _pods(doc: dict) -> list[dict]:
    """The pod specs of a RayService's or RayJob's cluster."""
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _ray_docs() -> list[dict]:
    return [*cluster.manifests("rayservice.yaml"), *cluster.manifests("rayjob.yaml")]


def test_the_rayservice_deploys_the_serve_config_the_code_renders():
    from ray.serve.schema import ServeDeploySchema

    assert cluster.main(["--check"]) == 0, "run python -m infra.cluster"
    (svc,) = cluster.manifests("rayservice.yaml")
    conf = yaml.safe_load(svc["spec"]["serveConfigV2"])
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(conf)  # Serve itself accepts it
    names = [a["name"] for a in conf["applications"]]
    assert names == ["recloop", "recloop-dashboard"]
    for app in conf["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert app["args"]["config"] == cluster.RUN_FILE


def test_the_mounted_run_file_is_a_valid_cluster_config(tmp_path):
    cfg = cluster.cluster_config(tmp_path)  # unknown keys would raise here
    assert cfg.serve.experiment.exists()  # the image's path, as in this checkout
    assert not cfg.ray.provisioned and not cfg.kafka.provisioned  # nothing is started
    assert cfg.feast.online_store == "redis"
    # The arms the RayService deploys are the experiment's.
    from recloop.experiment import load_experiment

    (svc,) = cluster.manifests("rayservice.yaml")
    deployments = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    arms = {d["name"].removeprefix("recommender-") for d in deployments[1:]}
    assert arms == {a.name for a in load_experiment(cfg.serve.experiment).arms}
    # State lives on the shared volume and the run file where the ConfigMap is mounted.
    for doc in _ray_docs():
        for pod in _pods(doc):
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["run"]["configMap"]["name"] == "recloop-run"
            assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "recloop-shared"
            for c in pod["containers"]:
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                assert Path(cluster.RUN_FILE).parent == Path(mounts["run"])
                assert Path(mounts["shared"]) in [cfg.home, *cfg.home.parents]
                assert c["workingDir"] == cluster.IMAGE_ROOT
    (pvc,) = cluster.manifests("storage.yaml")
    assert pvc["metadata"]["name"] == "recloop-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes it


def test_the_training_job_entrypoint_parses_as_a_recloop_command():
    from pipelines.continuous import build_parser
    from recloop.cli import JOBS

    (job,) = cluster.manifests("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["recloop", "train"] and JOBS["train"] == "pipelines.continuous"
    args = build_parser().parse_args(argv[2:])
    assert args.config == cluster.RUN_FILE and args.arm == "online"


def test_versions_and_images_agree_with_this_checkout():
    for doc in _ray_docs():
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray.__version__, "the image's Ray is uv.lock's"
        images = {c["image"] for pod in _pods(doc) for c in pod["containers"]}
        assert images == {"recloop:latest"}
    dockerfile = (PROJECT_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    uv = re.search(r"^UV_VERSION := (\S+)", makefile, re.M).group(1)
    assert f"ARG UV_VERSION={uv}" in dockerfile
    assert f"WORKDIR {cluster.IMAGE_ROOT}" in dockerfile
    assert "--extra cluster" in dockerfile  # Feast's Redis client


def test_the_ray_up_config_passes_rays_schema_and_sets_known_variables():
    from ray.autoscaler._private.util import prepare_config, validate_config

    conf = yaml.safe_load((PROJECT_ROOT / "infra" / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(conf))
    exported = re.findall(r"export (RECLOOP_\w+)=", " ".join(conf["setup_commands"]))
    assert exported and set(exported) <= set(_ENV_OVERRIDES) | {"RECLOOP_REDIS_CONNECTION"}


def test_feasts_redis_config_is_a_valid_feast_repo_config(monkeypatch):
    from feast.repo_config import RepoConfig

    monkeypatch.setenv("RECLOOP_REDIS_CONNECTION", "redis:6379")
    raw = (PROJECT_ROOT / "features" / "feature_store.redis.yaml").read_text()
    conf = yaml.safe_load(raw.replace("${RECLOOP_REDIS_CONNECTION}", "redis:6379"))
    repo = RepoConfig(repo_path=PROJECT_ROOT / "features", **conf)
    assert repo.online_store.type == "redis"
    assert repo.online_store.connection_string == "redis:6379"


MANIFESTS = ["configmap.yaml", "storage.yaml", "rayservice.yaml", "rayjob.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_names_its_kind_and_api(name):
    for doc in cluster.manifests(name):
        assert doc["apiVersion"] in ("v1", "ray.io/v1") and doc["kind"] and doc["metadata"]["name"]
