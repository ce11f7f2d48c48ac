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
        ({"train": {"data_engine": "spark"}}, "train.data_engine must be one of auto, ray"),
        ({"train": {"data_tasks": 0}}, "train.data_tasks must be >= 1"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, stack, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stack": stack}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("stack", "env", "message"),
    [
        (
            {"kafka": {"port": "abc"}},
            {},
            "kafka.port must be an integer, got 'abc' (Input should be a valid integer",
        ),
        ({"kafka": {"port": 90.5}}, {}, "kafka.port must be an integer, got 90.5"),
        ({"ray": {"start_timeout_s": "soon"}}, {}, "ray.start_timeout_s must be a number"),
        ({"serve": {"dashboard": "maybe"}}, {}, "serve.dashboard must be true or false"),
        ({"ray": {"num_cpus": "two"}}, {}, "ray.num_cpus must be an integer or null"),
        ({"kafka": {"host": ["a", "b"]}}, {}, "kafka.host must be text, got ['a', 'b']"),
        ({}, {"RECLOOP_KAFKA_PORT": "x9092"}, "kafka.port must be an integer, got 'x9092'"),
    ],
)
def test_values_of_the_wrong_type_are_refused_with_key_value_and_reason(
    tmp_path, stack, env, message
):
    """``kafka.port: abc`` was accepted as the string 'abc' (and failed later, somewhere
    else); a value is now read as its field's type or refused where it is set."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stack": stack}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env=env)
    assert message in str(err.value)


def test_text_that_reads_as_the_fields_type_is_converted(tmp_path):
    """What env vars and ``-o key=value`` flags give is text: numbers, booleans and paths
    in it are read as the field's type; numbers where text is wanted become text."""
    path = tmp_path / "ok.yaml"
    stack = {"kafka": {"port": "19092", "java": 17}, "ray": {"num_cpus": "2"}}
    stack |= {"serve": {"dashboard": "no"}, "cache_dir": str(tmp_path / "c")}
    path.write_text(yaml.safe_dump({"stack": stack}))
    cfg = load_config(path, env={"RECLOOP_SERVE_PORT": "18001"})
    assert cfg.kafka.port == 19092 and cfg.ray.num_cpus == 2 and cfg.ray.serve_port == 18001
    assert cfg.kafka.java == "17" and cfg.serve.dashboard is False
    assert cfg.cache_dir == tmp_path / "c"
    assert load_config(overrides={"ray.num_cpus": ""}, env={}).ray.num_cpus is None


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


def test_a_run_file_without_a_stack_section_gives_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"experiment": {"name": "x"}, "simulation": {"seed": 1}}))
    cfg = load_config(path, env={})
    assert cfg.train == load_config(env={}).train
    path.write_text(yaml.safe_dump({"stack": None, "experiment": {"name": "x"}}))
    assert load_config(path, env={}).kafka.port == 9092
    path.write_text(yaml.safe_dump({"trainn": {"workers": 1}}))  # a typo is still refused
    with pytest.raises(ConfigError, match="trainn"):
        load_config(path, env={})


def test_background_priority_lowers_every_thread_of_the_process():
    """``recloop.priority.background`` renices the threads that exist (a nice value is
    per thread on Linux) and those started after inherit it; it never raises priority.
    Run in a child process: the test process keeps its own priority."""
    import subprocess
    import sys

    code = """
import json, os, threading
from recloop import priority
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
out = priority.background(7)
after = threading.Thread(target=stop.wait); after.start()
nices = {t: priority.thread_nice(int(t)) for t in os.listdir('/proc/self/task')}
again = priority.background(3)  # never raises priority back
stop.set()
print(json.dumps({"out": out, "nices": nices, "again": again}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    got = json.loads(res.stdout)
    assert got["out"]["nice"] == 7 and "errors" not in got["out"]
    assert len(got["nices"]) >= 3 and set(got["nices"].values()) == {7}
    assert got["again"]["nice"] == 7


def test_settle_heap_freezes_the_start_up_heap_once():
    """``settle_heap`` takes what start-up allocated out of the collector's walks, once
    per process (a second call freezes nothing more: by then it may be garbage), and
    makes the young generation larger. In a child process: the test process's
    collector stays as it is."""
    import json
    import subprocess
    import sys

    code = """
import gc, json
from recloop import priority
keep = [[i] for i in range(50000)]
first = priority.settle_heap(12345)
more = [[i] for i in range(1000)]
second = priority.settle_heap()
print(json.dumps({"first": first, "second": second, "threshold": gc.get_threshold()}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got["first"]["frozen"] >= 50000
    assert got["second"]["frozen"] == got["first"]["frozen"]  # the later lists stay young
    assert got["threshold"][0] == 12345


def test_lower_this_thread_lowers_the_calling_thread_only():
    """A replica's model-load thread runs below its request threads; the rest of the
    process keeps its priority. In a child process."""
    import json
    import subprocess
    import sys

    code = """
import json, os, threading
from recloop import priority
got = {}
def work():
    got["thread"] = priority.lower_this_thread(9)
    got["again"] = priority.lower_this_thread(2)  # never raised back
t = threading.Thread(target=work); t.start(); t.join()
got["main"] = priority.thread_nice()
print(json.dumps(got))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got == {"thread": 9, "again": 9, "main": 0}


def test_the_idle_policy_puts_every_thread_in_sched_idle():
    """``background(..., idle=True)``: each thread of the process in SCHED_IDLE (runs
    only when no normal thread wants the core), threads started later too. In a child
    process, checked from this one: a SCHED_IDLE child on a busy machine may get no
    core for minutes (CI once waited 600 s for it to print), so the test reads the
    policy of each of its threads from outside and never waits on it unboundedly."""
    import json
    import os
    import select
    import subprocess
    import sys
    import time

    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("no SCHED_IDLE on this platform")
    code = """
import json, os, sys, threading
from recloop import priority
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
print("ready", flush=True)
out = priority.background(0, idle=True)
after = threading.Thread(target=stop.wait); after.start()
print(json.dumps({"out": out, "after": after.native_id}), flush=True)
sys.stdin.read()
stop.set()
"""
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"  # at normal priority: no wait
        got = None
        if select.select([child.stdout], [], [], 60)[0]:  # idle from here on: bounded
            got = json.loads(child.stdout.readline())
        else:
            time.sleep(0.5)  # starved: what matters is readable from outside anyway
        policies = {}
        for tid in os.listdir(f"/proc/{child.pid}/task"):
            try:
                policies[int(tid)] = os.sched_getscheduler(int(tid))
            except OSError:  # the thread ended between the listing and the read
                pass
        assert len(policies) >= 2, policies  # the main thread and the one started before
        assert all(p == os.SCHED_IDLE for p in policies.values()), policies
        if got is not None:
            assert got["out"]["policy"] == "idle" and "errors" not in got["out"]
            assert policies[got["after"]] == os.SCHED_IDLE  # started later: inherited
    finally:
        child.kill()
        child.wait(timeout=30)


def test_priority_is_validated():
    with pytest.raises(ConfigError, match="background_nice"):
        load_config(overrides={"priority.background_nice": 25}, env={})
    cfg = load_config(overrides={"priority.background_cpus": [0]}, env={})
    assert cfg.priority.background_cpus == [0] and cfg.priority.background_nice == 10
    assert cfg.priority.background_policy == "idle"
    with pytest.raises(ConfigError, match="background_policy"):
        load_config(overrides={"priority.background_policy": "realtime"}, env={})
