"""Stack configuration: defaults, YAML, env vars, overrides, and refusals."""

from __future__ import annotations

import pytest
import yaml

from recloop.config import ConfigError, load_config


def test_defaults_provision_everything_on_loopback(tmp_path):
    cfg = load_config(env={})
    assert cfg.kafka.provisioned and cfg.ray.provisioned
    assert cfg.kafka.host == "127.0.0.1" and cfg.ray.host == "127.0.0.1"
    assert cfg.kafka.bootstrap == "127.0.0.1:9092"
    assert cfg.kafka.heap_mb <= 512
    assert cfg.feast.online_store == "sqlite"
    assert cfg.cache_dir == cfg.home / "cache"


def test_yaml_stack_section_env_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "stack": {
                    "home": str(tmp_path / "h"),
                    "kafka": {"port": 19092},
                    "ray": {"serve_port": 9},
                },
                "arms": {"control": 0.5},  # other components' sections are not the stack's business
            }
        )
    )
    cfg = load_config(
        path, env={"RECLOOP_KAFKA_PORT": "29092"}, overrides={"ray.serve_port": 18000}
    )
    assert cfg.home == tmp_path / "h"
    assert cfg.kafka.port == 29092  # env beats YAML
    assert cfg.ray.serve_port == 18000  # flag beats YAML


def test_external_kafka_and_ray_are_used_not_provisioned():
    cfg = load_config(
        env={
            "RECLOOP_KAFKA_BOOTSTRAP": "kafka-1:9092,kafka-2:9092",
            "RECLOOP_RAY_ADDRESS": "10.0.0.5:6379",
        }
    )
    assert not cfg.kafka.provisioned and cfg.kafka.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert not cfg.ray.provisioned and cfg.ray.gcs_address == "10.0.0.5:6379"


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        ({"kafka": {"prot": 1}}, "unknown key(s) in kafka.: prot"),
        ({"nonsense": 1}, "unknown key(s) in config: nonsense"),
        ({"kafka": {"heap_mb": 2048}}, "heap_mb must be within"),
        ({"kafka": {"port": 1, "controller_port": 1}}, "must differ"),
        ({"feast": {"online_store": "dynamo"}}, "must be 'sqlite' or 'redis'"),
        ({"kafka": 3}, "kafka must be a mapping"),
        ({"serve": {"replica_resources": {"CPU": 1}}}, "has its own setting"),
        ({"ingest": {"consumer_resources": {"recloop_ingest": 0}}}, "must be a number > 0"),
        ({"train": {"worker_resources": ["gpu"]}}, "train.worker_resources must be a mapping"),
        ({"serve": {"proxy_location": "Everywhere"}}, "EveryNode or HeadOnly"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, stack, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stack": stack}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_custom_resources_place_each_part_and_stay_out_of_the_default_serve_config():
    from serving.app import build_app, render_serve_config

    cfg = load_config(
        overrides={
            "serve.replica_resources.recloop_serve": "0.01",  # as `-o` gives it: text
            "serve.router_resources": {"recloop_edge": 1},
            "ingest.consumer_resources.recloop_ingest": 0.5,
            "train.worker_resources.recloop_train": 0.01,
            "dpo.sampler_resources.recloop_ingest": 0.01,
            "serve.proxy_location": "HeadOnly",
        },
        env={},
    )
    assert cfg.serve.replica_resources == {"recloop_serve": 0.01}
    assert cfg.ingest.consumer_resources == {"recloop_ingest": 0.5}
    conf = render_serve_config(cfg)
    assert conf["proxy_location"] == "HeadOnly"
    opts = {d["name"]: d["ray_actor_options"] for d in conf["applications"][0]["deployments"]}
    assert opts["Router"] == {"num_cpus": cfg.serve.router_cpus, "resources": {"recloop_edge": 1}}
    assert all(o["resources"] == {"recloop_serve": 0.01} for n, o in opts.items() if n != "Router")
    router = build_app(cfg, versions={})
    assert router._bound_deployment.ray_actor_options["resources"] == {"recloop_edge": 1.0}
    default = render_serve_config(load_config(env={}))
    assert all(
        set(d["ray_actor_options"]) == {"num_cpus"}
        for d in default["applications"][0]["deployments"]
    )
