"""Typed configuration of the local stack.

One YAML file describes a run; each section maps onto one dataclass here, and every
CLI flag maps onto a field. Unknown keys are an error, never silently ignored.

Resolution order for a field: dataclass default < YAML file < ``RECLOOP_*`` env var
(for the few fields that have one) < explicit override (CLI flag).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class KafkaConfig:
    """Kafka: either the broker recloop provisions, or one you already run.

    Set ``bootstrap_servers`` to use your own Kafka; recloop then provisions nothing and
    only creates the declared topics there.
    """

    bootstrap_servers: str | None = None
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap_mb: int = 512
    java: str = "java"
    mvn: str = "mvn"
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 64 <= self.heap_mb <= 512:
            raise ConfigError(f"kafka.heap_mb must be within 64..512, got {self.heap_mb}")
        if self.port == self.controller_port:
            raise ConfigError("kafka.port and kafka.controller_port must differ")

    @property
    def provisioned(self) -> bool:
        """True when recloop runs the broker itself."""
        return self.bootstrap_servers is None

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.host}:{self.port}"


def _resources(name: str, resources: Any) -> dict[str, float]:
    """Custom Ray resources a part asks for (names other than Ray's own, amounts > 0;
    numbers written as text, as ``-o`` overrides give them, are read as numbers)."""
    if not isinstance(resources, dict):
        raise ConfigError(f"{name} must be a mapping of resource name to amount")
    out: dict[str, float] = {}
    for k, v in resources.items():
        if k in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"{name}: {k!r} has its own setting; list custom resources only")
        try:
            amount = float(v) if not isinstance(v, bool) else float("nan")
        except (TypeError, ValueError):
            amount = float("nan")
        if not amount > 0:
            raise ConfigError(f"{name}[{k!r}] must be a number > 0, got {v!r}")
        out[str(k)] = amount
    return out


@dataclass
class RayConfig:
    """Ray: a local head started by ``recloop up``, or an existing cluster's address."""

    address: str | None = None
    host: str = "127.0.0.1"
    port: int = 6380
    dashboard_port: int = 8265
    client_port: int = 10001
    agent_listen_port: int = 52365
    num_cpus: int | None = None
    object_store_mb: int = 512
    serve_port: int = 8000
    start_timeout_s: float = 90.0
    # Ray's token authentication: "disabled" for the local head (it binds to the host
    # above), "token" on a shared cluster. Set explicitly, because Ray turns token mode on
    # by itself once any local ray.init() has left a token in ~/.ray, and a head and its
    # drivers that disagree cannot talk. The RAY_AUTH_MODE variable, when set, wins.
    auth_mode: str = "disabled"
    # The nice value of the head's worker processes (Ray's own default is 15). 0: the
    # serving replicas run at normal priority, background work below them (see
    # PriorityConfig). On a cluster you start yourself, start the nodes with
    # RAY_worker_niceness=0 in their environment for the same effect.
    worker_niceness: int = 0
    # How long an idle worker process of Ray's task pool lives (Ray's own default: 1 s
    # once the node has as many workers as CPUs, which a stack of actors always has).
    # A training round's Ray Data tasks run every minute or two: with the default each
    # round started new workers (~14 s of imports on two busy cores, measured); kept,
    # the round reads in under a second. On a cluster you start yourself, start the
    # nodes with RAY_idle_worker_killing_time_threshold_ms set likewise.
    idle_worker_keep_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.idle_worker_keep_s >= 0:
            raise ConfigError(f"ray.idle_worker_keep_s must be >= 0: {self.idle_worker_keep_s}")
        if not 0 <= int(self.worker_niceness) <= 19:
            raise ConfigError(
                f"ray.worker_niceness must be within 0..19, got {self.worker_niceness}"
            )

    @property
    def provisioned(self) -> bool:
        return self.address is None

    @property
    def gcs_address(self) -> str:
        return self.address or f"{self.host}:{self.port}"


@dataclass
class FeastConfig:
    """Feast: ``sqlite`` (embedded default) or ``redis`` online store."""

    online_store: str = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    repo_dir: Path = PROJECT_ROOT / "features"

    def __post_init__(self) -> None:
        if self.online_store not in ("sqlite", "redis"):
            raise ConfigError(
                f"feast.online_store must be 'sqlite' or 'redis', got {self.online_store!r}"
            )
        self.repo_dir = Path(self.repo_dir)


@dataclass
class DataConfig:
    """Where the interaction data comes from.

    ``movielens_dir`` is read in place (its terms forbid copying it into the repo). When
    it is absent, recloop fetches it once (``fetch``); when that fails, or ``synthetic``
    is set, recloop generates MovieLens-shaped data and says why.
    """

    movielens_dir: Path = PROJECT_ROOT.parent / "shared" / "data" / "ml-100k"
    synthetic: bool = False
    # Not at movielens_dir: fetch it from GroupLens on first use (SHA-256 checked, kept
    # in ~/.cache/recloop, outside the repository); off, or offline: generated data, and
    # the run says so (recloop.data.resolve_movielens).
    fetch: bool = True
    synthetic_users: int = 200
    synthetic_items: int = 300
    synthetic_ratings: int = 6000
    seed: int = 0

    def __post_init__(self) -> None:
        self.movielens_dir = Path(self.movielens_dir)

    @property
    def use_synthetic(self) -> bool:
        return self.synthetic or not (self.movielens_dir / "u.data").exists()


@dataclass
class ServeConfig:
    """The recommendation service: where models come from, the A/B experiment, batching
    and the per-replica budget on a small machine."""

    registry_uri: str | None = None  # default <home>/registry; any pyarrow.fs URI (s3://…)
    experiment: Path = PROJECT_ROOT / "infra" / "serve" / "experiment.yaml"
    app_name: str = "recloop"
    beam_width: int = 32
    # Requests per batched beam search. Batching is continuous: a request that finds the
    # model idle starts at once; those arriving meanwhile go together next.
    max_batch_size: int = 16
    # Where the arms' models run: "inline", in the ingress (Router) replica, one engine
    # per arm (one process hop less per request); "split", one Recommender deployment
    # per arm (a process per arm, scaled per arm by the experiment's replicas).
    topology: str = "split"
    replica_cpus: float = 0.25  # fractional: replicas share 2 cores with training
    router_cpus: float = 0.1
    # Custom Ray resources each replica / the router asks for, to place them on the
    # nodes that declare them (e.g. {"recloop_serve": 0.01}; see "Run on a Ray cluster").
    replica_resources: dict[str, float] = field(default_factory=dict)
    router_resources: dict[str, float] = field(default_factory=dict)
    proxy_location: str = "EveryNode"  # Serve's HTTP proxies: EveryNode, HeadOnly
    torch_threads: int = 1
    max_ongoing_requests: int = 64
    max_body_bytes: int = 8192
    # Serve's access log line per request in each replica: CPU on the request path
    # (about a millisecond per request and replica here); /stats counts requests anyway.
    access_log: bool = False
    feature_timeout_s: float = 0.5
    # A context-trained model's preference anchors rank items by popularity: the
    # checkpoint's training counts plus Feast item_stats clicks, re-read this often.
    anchor_refresh_s: float = 30.0
    impression_buffer: int = 10_000  # events waiting for Kafka; beyond it they are dropped
    dpo_fraction: float = 0.01  # share of requests mirrored to the DPO sampler
    dpo_actor: str = "dpo_sampler"
    dashboard: bool = True  # the live dashboard at /dashboard (serving.dashboard)
    dashboard_cpus: float = 0.05
    dashboard_interval_s: float = 5.0  # between the monitor's snapshots

    def __post_init__(self) -> None:
        self.experiment = Path(self.experiment)
        if not 0.0 <= self.dpo_fraction <= 1.0:
            raise ValueError(f"serve.dpo_fraction must be within [0, 1], got {self.dpo_fraction}")
        if self.beam_width < 1 or self.max_batch_size < 1:
            raise ValueError("serve.beam_width and serve.max_batch_size must be >= 1")
        if self.topology not in ("inline", "split"):
            raise ConfigError(f"serve.topology must be inline or split, got {self.topology!r}")
        if self.proxy_location not in ("EveryNode", "HeadOnly"):
            raise ConfigError(
                f"serve.proxy_location must be EveryNode or HeadOnly, got {self.proxy_location!r}"
            )
        self.replica_resources = _resources("serve.replica_resources", self.replica_resources)
        self.router_resources = _resources("serve.router_resources", self.router_resources)


@dataclass
class IngestConfig:
    """The Kafka ingestor: consumer group, micro-batches, the feedback join window."""

    group_id: str = "recloop-ingestor"
    consumers: int = 1  # ingestor actors in the group (each owns some partitions)
    consumer_cpus: float = 0.2
    consumer_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    # Adaptive micro-batches: a flush comes after ``batch_events`` records, a target that
    # doubles per flush while the consumer is behind (up to ``batch_max_events``) and
    # falls back once it has caught up; when caught up, ``flush_min_s`` after the first
    # unflushed record (longer if flushes are slow: at most a third of the time goes to
    # them); in any case ``flush_interval_s`` after it.
    batch_events: int = 2000
    batch_max_events: int = 32_000
    # Bytes fetched per partition per request. A consumer that has taken everything it
    # fetched waits a round trip for more; with 1 MB (the clients' default) a backlog
    # drain spent a fifth of its time so (bench-ingest's poll:starved), with 4 MB none.
    fetch_partition_bytes: int = 4 * 1024 * 1024
    flush_min_s: float = 0.2
    flush_interval_s: float = 2.0
    # User history goes to the online store with every flush (serving reads it per
    # request); user and item counters every ``stats_push_s`` (serving reads item clicks
    # every ``serve.anchor_refresh_s``), and always when the ingestor stops or gives a
    # partition away. Unpushed ones are saved with each commit and pushed after a crash.
    stats_push_s: float = 10.0
    join_window_ms: int = 30 * 60 * 1000  # event time: feedback later than this is late
    max_wait_s: float = 120.0  # wall time an open session may wait without a watermark
    snapshot_every: int = 50  # flushes between full state snapshots (deltas in between)
    history_len: int = 50  # features.definitions.HISTORY_LEN
    offline_push: bool = False  # also append pushes to Feast's offline files (the lake is
    # the offline record; the file offline store rewrites its file on every append)
    progress_s: float = 5.0
    lake_dir: Path | None = None  # default <home>/lake
    # Lake upkeep by the first ingestor: Delta compaction (one small file per flush into
    # big ones) and a log checkpoint every ``compact_every_s`` (0: never), then vacuum of
    # the files no version of the last ``vacuum_retention_h`` hours reads.
    compact_every_s: float = 600.0
    vacuum_retention_h: float = 24.0
    # The Kafka consumer client behind recloop.kafka_io's interface: "kafka-python" (pure
    # Python) or "confluent" (confluent-kafka, librdkafka). bench-ingest measures both.
    client: str = "kafka-python"

    def __post_init__(self) -> None:
        self.lake_dir = Path(self.lake_dir) if self.lake_dir else None
        if self.client not in ("kafka-python", "confluent"):
            raise ConfigError(
                f"ingest.client must be 'kafka-python' or 'confluent', not {self.client!r}"
            )
        if self.fetch_partition_bytes < 64 * 1024:
            raise ConfigError("ingest.fetch_partition_bytes must be >= 65536 (64 KiB)")
        if self.consumers < 1 or self.batch_events < 1 or self.join_window_ms < 1:
            raise ConfigError("ingest.consumers, batch_events and join_window_ms must be >= 1")
        self.batch_max_events = max(int(self.batch_max_events), int(self.batch_events))
        if self.compact_every_s < 0 or self.vacuum_retention_h < 0:
            raise ConfigError("ingest.compact_every_s and vacuum_retention_h must be >= 0")
        if self.flush_min_s < 0 or self.flush_interval_s <= 0 or self.stats_push_s < 0:
            raise ConfigError(
                "ingest.flush_min_s and stats_push_s must be >= 0, flush_interval_s > 0"
            )
        self.consumer_resources = _resources("ingest.consumer_resources", self.consumer_resources)


REWARD_WEIGHTINGS = ("none", "watch")
DATA_ENGINES = ("auto", "ray", "local")


@dataclass
class TrainLoopConfig:
    """Continuous training: one round per batch of newly landed lake partitions."""

    arm: str = "online"  # the arm whose lineage the rounds publish to and promote
    # 1: the warm trainer, in the trainer's own process, model resident between rounds;
    # more: a Ray Train job of that many DDP workers (gloo) per round, for a cluster.
    workers: int = 1
    cpus_per_worker: float = 0.4  # the trainer actor's (or each DDP worker's) CPU share
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    torch_threads: int = 1
    min_sessions: int = 200  # high-quality sessions needed before a round starts
    max_sessions: int = 20_000  # per round; the rest waits for the next round
    # One pass: under the simulator's sequential users a round of two epochs on the arm's
    # own sessions cost 14% of the seed's expected watch time offline, one pass nothing
    # (make bench-ipa-offline); the round learns from fresh data, not from repetition.
    epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-4
    min_clicks: int = 3  # a session is high quality with this many clicks ...
    min_watch_s: float = 600.0  # ... or this much watch time, or a like or a follow
    holdout_fraction: float = 0.2  # the newest sessions of a round: the gate's slice
    tolerance: float = 0.02  # relative regression allowed on the held-out metric
    poll_s: float = 1.0  # how often the lake's commit log is checked for new sessions
    checkpoint_every_steps: int = 50
    exclusive_rounds: bool = True  # rounds of different arms on one machine take turns
    dpo: bool = False  # also train on the arm's preference pairs (online-ipa; see DpoConfig)
    # How much each clicked item counts in a round's next-token loss: "watch", its watch
    # time over the round's mean (reward-weighted likelihood: the round learns what users
    # watch longest, not only what they click); "none", every click alike. Under the
    # simulator's users, in the demo's volume, "none" rounds left the seed where it was
    # and "watch" rounds overtook popularity (make bench-loop-offline)
    reward_weighting: str = "watch"
    # How a round reads its sessions and maps them to examples: "ray", Ray Data tasks
    # over the sessions Delta table (any node of a cluster); "local", in the round's
    # process; "auto", Ray Data when the process is connected to a Ray cluster of more
    # than one node (on one node its tasks share the round's cores: start-up, no gain).
    data_engine: str = "auto"
    data_cpus: float = 0.1  # each Ray Data task's CPU share (it only schedules)
    # Ray Data tasks at once per step of a round's dataset: each new one may start a
    # worker process (~2 s of imports on one core); a cluster can raise it
    data_tasks: int = 2
    # A round's Ray Data execution that makes no progress this long (no free CPU share
    # for its tasks) stops; the round reads in process ("auto") or fails ("ray")
    data_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.worker_resources = _resources("train.worker_resources", self.worker_resources)
        if self.data_engine not in DATA_ENGINES:
            raise ConfigError(
                f"train.data_engine must be one of {', '.join(DATA_ENGINES)}: {self.data_engine!r}"
            )
        if not self.data_cpus > 0:
            raise ConfigError(f"train.data_cpus must be > 0: {self.data_cpus!r}")
        if int(self.data_tasks) < 1:
            raise ConfigError(f"train.data_tasks must be >= 1: {self.data_tasks!r}")
        if not self.data_timeout_s > 0:
            raise ConfigError(f"train.data_timeout_s must be > 0: {self.data_timeout_s!r}")
        if self.reward_weighting not in REWARD_WEIGHTINGS:
            raise ConfigError(
                f"train.reward_weighting must be one of {', '.join(REWARD_WEIGHTINGS)}: "
                f"{self.reward_weighting!r}"
            )


@dataclass
class DpoConfig:
    """Iterative preference alignment (OneRec 3.3): the DPO sample server that mines
    preference pairs from the mirrored share of traffic (``serve.dpo_fraction``), the
    session reward model that ranks them, and the DPO term of the training rounds of the
    ``online-ipa`` arms."""

    arms: list[str] = field(default_factory=list)  # arms to mine pairs for; [] = every
    # online-ipa arm of the serving experiment
    candidates: int = 32  # N sessions generated per mirrored request (the beam's top N)
    beam_width: int = 32  # beam search width of the sampler (>= candidates)
    # Pairs per mirrored request: the i-th best against the i-th worst of the ranked
    # candidates, i < pairs_per_request (disjoint; while rewards differ). One pair per
    # request leaves DPO a few dozen pairs at 1% mirrored, which cost watch time offline;
    # past the 8th pair the reward model's order agrees with the hidden users' less than
    # 80% of the time (make bench-ipa-offline, docs/preference-alignment.md).
    pairs_per_request: int = 8
    reward_weights: dict[str, float] = field(default_factory=lambda: {"swt": 1.0})
    queue_size: int = 256  # mirrored requests waiting; beyond it they are dropped (counted)
    sampler_cpus: float = 0.2
    sampler_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    torch_threads: int = 1
    reload_s: float = 5.0  # how often the sampler checks the registry for promotions
    beta: float = 0.1  # DPO temperature (eq. 10)
    weight: float = 1.0  # weight of the DPO loss beside the next-token loss
    max_pairs: int = 20_000  # pairs consumed per round (the rest wait for the next)
    reward_epochs: int = 5  # reward-model fine-tuning epochs per round
    reward_lr: float = 3e-3

    def __post_init__(self) -> None:
        if self.candidates < 2 or self.beam_width < self.candidates:
            raise ConfigError("dpo.candidates must be >= 2 and dpo.beam_width >= candidates")
        if self.pairs_per_request < 1:
            raise ConfigError("dpo.pairs_per_request must be >= 1")
        if self.beta <= 0 or self.weight < 0:
            raise ConfigError("dpo.beta must be > 0 and dpo.weight >= 0")
        if not self.reward_weights:
            raise ConfigError("dpo.reward_weights must name at least one target")
        self.sampler_resources = _resources("dpo.sampler_resources", self.sampler_resources)


@dataclass
class PriorityConfig:
    """Who gets the CPU first on a shared machine. Ray's ``num_cpus`` only schedules: on
    a 2-core box training, the ingestor and the DPO sampler would otherwise take cycles
    from the serving replicas. Background work (training rounds, ingestor, DPO sampler)
    runs at ``background_nice`` (Linux nice, 0..19; 0 leaves it as it is) and, when
    ``background_cpus`` names cores, only on those (CPU affinity); serving keeps the
    default priority. On a cluster where each part has its own node, set 0 / []."""

    background_nice: int = 10
    background_cpus: list[int] = field(default_factory=list)
    # "idle": background threads also go to Linux's SCHED_IDLE class (they run only when
    # no normal thread wants the core); "nice": the nice value alone.
    background_policy: str = "idle"

    def __post_init__(self) -> None:
        if self.background_policy not in ("idle", "nice"):
            raise ConfigError(
                f"priority.background_policy must be idle or nice, got {self.background_policy!r}"
            )
        if not 0 <= int(self.background_nice) <= 19:
            raise ConfigError(
                f"priority.background_nice must be within 0..19, got {self.background_nice}"
            )
        self.background_cpus = [int(c) for c in self.background_cpus]
        if any(c < 0 for c in self.background_cpus):
            raise ConfigError("priority.background_cpus must name cores >= 0")


@dataclass
class StackConfig:
    """The whole local stack. ``home`` holds all state: broker data, logs, pid files,
    Feast registry and online store. ``cache_dir`` holds what is expensive to fetch
    (the Maven repository and the broker's jars) and may be shared between homes."""

    home: Path = PROJECT_ROOT / ".recloop"
    cache_dir: Path | None = None
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    feast: FeastConfig = field(default_factory=FeastConfig)
    data: DataConfig = field(default_factory=DataConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)

    def __post_init__(self) -> None:
        self.home = Path(self.home).absolute()
        self.cache_dir = Path(self.cache_dir).absolute() if self.cache_dir else self.home / "cache"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def feast_dir(self) -> Path:
        return self.home / "feast"

    @property
    def lake_dir(self) -> Path:
        return self.ingest.lake_dir or self.home / "lake"

    @property
    def registry_uri(self) -> str:
        return self.serve.registry_uri or str(self.home / "registry")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings); ``from_dict`` reads it back. Used to hand
        the config to Ray actors and Serve replicas without pickling objects."""

        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StackConfig:
        return _build(cls, values, "")


_ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "RECLOOP_HOME": ("home",),
    "RECLOOP_CACHE": ("cache_dir",),
    "RECLOOP_KAFKA_BOOTSTRAP": ("kafka", "bootstrap_servers"),
    "RECLOOP_KAFKA_PORT": ("kafka", "port"),
    "RECLOOP_RAY_ADDRESS": ("ray", "address"),
    "RECLOOP_SERVE_PORT": ("ray", "serve_port"),
    "RECLOOP_FEAST_ONLINE_STORE": ("feast", "online_store"),
    "RECLOOP_MOVIELENS_DIR": ("data", "movielens_dir"),
    "RECLOOP_REGISTRY_URI": ("serve", "registry_uri"),
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a (nested) dataclass from a mapping, rejecting unknown keys and values
    that are not of their field's type (``kafka.port: abc``), each with its key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        sub = fields[name].default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a mapping, got {value!r}")
            value = _build(sub, value, f"{where}{name}.")
        else:
            value = _typed(f"{where}{name}", hints[name], value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where or 'config'}: {exc}") from exc


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_SCALARS = (bool, int, float, str, Path, type(None))
# Numbers are read as text where text is wanted (YAML reads ``java: 17`` as an int).
_LAX = ConfigDict(coerce_numbers_to_str=True)


@functools.cache
def _adapter(tp: Any) -> TypeAdapter | None:
    """A validator for a field of plain scalar type (``int``, ``float``, ``bool``,
    ``str``, ``Path``, or one of them or None); None for the others (mappings are
    checked by their section's own rules)."""
    if not all(m in _SCALARS for m in _members(tp)):
        return None
    return TypeAdapter(tp, config=_LAX)


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a field's annotation admits (``int | None``: int and NoneType)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return typing.get_args(tp) if union else (tp,)


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    names |= {Path: "a path", type(None): "null"}
    return " or ".join(names.get(m, getattr(m, "__name__", str(m))) for m in _members(tp))


def _typed(key: str, tp: Any, value: Any) -> Any:
    """``value`` as the field's type (text that reads as one is converted: ``"9092"``
    for an integer, ``"yes"`` for true); ConfigError naming the key otherwise."""
    adapter = _adapter(tp)
    if adapter is None:
        return value
    if value == "" and type(None) in _members(tp):
        return None  # an empty setting (``cache_dir: ""``) is no setting
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        reason = exc.errors(include_url=False)[0]["msg"]
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({reason})") from None


# A run file's sections that belong to other components than the stack.
RUN_FILE_SECTIONS = {"experiment", "simulation", "analysis"}


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> StackConfig:
    """Load the stack configuration.

    ``path`` is a YAML file whose top level may hold a ``stack:`` section (the rest of a
    run file belongs to other components) or the stack keys themselves. ``overrides`` use
    dotted keys (``{"kafka.port": 19092}``).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        if "stack" in loaded:
            raw = loaded["stack"] or {}
        elif set(loaded) & RUN_FILE_SECTIONS:  # a run file without a stack section
            raw = {}
        else:
            raw = loaded

    env = os.environ if env is None else env
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for var, keys in _ENV_OVERRIDES.items():
        if env.get(var):  # text: read as the field's type by _build
            _set(merged, keys, env[var])
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(merged, tuple(dotted.split(".")), value)
    return _build(StackConfig, merged, "")


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value
