"""The recommendation service: a FastAPI ingress on Ray Serve in front of one OneRec
deployment per A/B arm.

    POST /recommend {user_id, session_size?, exclude_seen?, context?}
         -> {request_id, arm, model_version, items: [{item_id, score, position}]}
    GET  /healthz      GET /arms      GET /stats      GET /openapi.json

``Router`` (the ingress) assigns the user to an arm (stable hash of user id and the
experiment's salt), reads the user's history from Feast, asks the arm's ``Recommender``
for a session, logs the impression to Kafka off the request path and mirrors a
deterministic share of requests to the DPO sampler actor when one runs.

``Recommender`` replicas batch concurrent requests continuously (``serving.batcher``:
no fixed wait; those arriving during a batch go together next) into one
trie-constrained beam search. The model version is Serve's ``user_config``: a promotion
redeploys the application with the new version, Serve calls ``reconfigure`` on every
running replica, and each loads the new checkpoint off to the side and swaps it in with
one assignment; requests in flight finish on the model they started with.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at
# run time, and Serve's ingress wrapper cannot resolve string annotations.

import asyncio
import collections
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from recloop.config import StackConfig
from recloop.events import MAX_EVENT_TIME_MS, Impression
from recloop.inference import BaselineModel, LoadedModel  # noqa: F401 (re-exported)
from recloop.ray_head import auth_headers
from serving.engine import ArmEngine

log = logging.getLogger("recloop.serve")

NAMESPACE = "recloop"
MAX_CONTEXT_KEYS = 16


# --------------------------------------------------------------------------- API schema
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(ge=0, le=2**63 - 1, description="the user to recommend for")
    session_size: int | None = Field(
        default=None, ge=1, le=64, description="items in the session (default: the model's M)"
    )
    exclude_seen: bool = Field(default=True, description="never recommend history items")
    context: dict[str, str] | None = Field(
        default=None,
        description=f"tags logged with the impression (≤ {MAX_CONTEXT_KEYS}), e.g. surface "
        "or device; a model trained with those tags (pretrain --context-tags) reads them",
    )
    event_time_ms: int | None = Field(
        default=None,
        ge=0,
        le=MAX_EVENT_TIME_MS,
        description="the client's clock (ms since the epoch) for the impression's event "
        "time; default the server's. Simulators on a virtual clock send theirs.",
    )

    @field_validator("context")
    @classmethod
    def _small_context(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_CONTEXT_KEYS:
            raise ValueError(f"context has {len(v)} keys; at most {MAX_CONTEXT_KEYS}")
        for k, val in v.items():
            if not 1 <= len(k) <= 64 or len(val) > 256:
                raise ValueError("context keys must be 1-64 characters, values at most 256")
        return v


class ServedItem(BaseModel):
    item_id: int
    score: float = Field(description="log p of the item given the history and items before it")
    position: int


class RecommendResponse(BaseModel):
    request_id: str
    arm: str
    model_version: str
    items: list[ServedItem]


class ArmInfo(BaseModel):
    arm: str
    share: float
    lineage: str
    model_version: str | None
    scoring: str = "beam"
    replicas: list[dict[str, Any]]


# --------------------------------------------------------------------------- model side
# An arm's model in a process (batching, loading, fallback) is serving.engine's
# ArmEngine: in a Recommender replica of its own (serve.topology: split) or in the
# Router's replica (inline).
def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]


def replica_info(replica: str, engine: ArmEngine) -> dict:
    """What ``/arms`` lists per replica of an arm: the engine's state and the CPU time
    its process has used so far."""
    return {"replica": replica, **engine.info(), "cpu_s": time.process_time()}


@serve.deployment(max_ongoing_requests=64, health_check_period_s=5)
class Recommender:
    """One arm's model. ``user_config = {"version": ...}`` selects the registry version;
    an optional ``"max_batch"`` sets the batch limit of the running replica in place
    (``serve.max_batch_size`` otherwise)."""

    def __init__(self, cfg: dict, arm: str, lineage: str, scoring: dict | None = None) -> None:
        self.engine = ArmEngine(StackConfig.from_dict(cfg), arm, lineage, scoring)
        self.replica = _replica_id()

    async def reconfigure(self, user_config: dict) -> None:
        self.engine.set_max_batch((user_config or {}).get("max_batch"))
        await self.engine.set_version((user_config or {}).get("version"))

    def version(self) -> str | None:
        return self.engine.version()

    async def generate(self, request: dict) -> dict:
        return await self.engine.generate(request)

    def info(self) -> dict:
        return replica_info(self.replica, self.engine)


# --------------------------------------------------------------------------- DPO mirror
def mirrored(request_id: str, fraction: float) -> bool:
    """Deterministic sampling: the same request id is always in or always out."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class DpoMirror:
    """Hands sampled requests to the DPO sampler actor, if one is registered; a missing
    actor is looked up again at most every ``retry_s`` seconds."""

    def __init__(self, actor_name: str, fraction: float, retry_s: float = 10.0) -> None:
        self.actor_name, self.fraction, self.retry_s = actor_name, fraction, retry_s
        self._actor: Any = None
        self._next_lookup = 0.0
        self.counts = {"sampled": 0, "sent": 0, "no_sampler": 0, "errors": 0}

    def _get(self) -> Any:
        import ray

        if self._actor is None and time.monotonic() >= self._next_lookup:
            try:
                self._actor = ray.get_actor(self.actor_name, namespace=NAMESPACE)
            except ValueError:
                self._next_lookup = time.monotonic() + self.retry_s
        return self._actor

    def offer(self, request_id: str, payload: dict) -> None:
        if not mirrored(request_id, self.fraction):
            return
        self.counts["sampled"] += 1
        actor = self._get()
        if actor is None:
            self.counts["no_sampler"] += 1
            return
        try:
            actor.offer.remote(payload)  # fire and forget: never on the response path
            self.counts["sent"] += 1
        except Exception:
            self.counts["errors"] += 1
            self._actor = None


# --------------------------------------------------------------------------- ingress
LATENCY_WINDOW = 2000
GENERATE_ATTEMPTS = 3  # a request whose recommender replica died is tried again, twice


def latency_summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """p50 / p90 / p99 (nearest rank) and count of ``values``, in their unit."""
    xs = sorted(values)
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "n": 0}

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))], 2)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(xs)}


api = FastAPI(
    title="recloop",
    version="1",
    description="Generative session recommendations (OneRec) with A/B arms.",
)


_MAX_BODY = [8192]  # bytes; the Router replica sets it from its config


class _BoundedBody:
    """Refuse oversized bodies before parsing them (413 with the limit). A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` runs each request through extra
    tasks and streams, CPU on every request of the service."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            limit = _MAX_BODY[0]
            for name, value in scope.get("headers") or ():
                if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                    detail = {"detail": f"request body over {limit} bytes"}
                    await JSONResponse(detail, status_code=413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


api.add_middleware(_BoundedBody)


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(api)
class Router:
    """The ingress. ``recommenders``: each arm's Recommender deployment (``split``);
    None: each arm's ``ArmEngine`` runs here (``inline``), and ``user_config =
    {"versions": {arm: version}}`` selects their versions."""

    def __init__(self, cfg: dict, recommenders: dict[str, DeploymentHandle] | None = None) -> None:
        from recloop.experiment import load_experiment
        from serving.features import FeatureClient
        from serving.impressions import ImpressionLogger
        from serving.metrics import RouterMetrics

        self.cfg = StackConfig.from_dict(cfg)
        s = self.cfg.serve
        self.experiment = load_experiment(s.experiment)
        self.recommenders = recommenders or {}
        self.engines: dict[str, ArmEngine] = {}
        if recommenders is None:
            self.engines = {
                a.name: ArmEngine(self.cfg, a.name, a.lineage, a.scoring_options())
                for a in self.experiment.arms
            }
        self.replica = _replica_id()
        self.features = FeatureClient(self.cfg, timeout_s=s.feature_timeout_s)
        self.impressions = ImpressionLogger(self.cfg.kafka.bootstrap, s.impression_buffer)
        self.dpo = DpoMirror(s.dpo_actor, s.dpo_fraction)
        _MAX_BODY[0] = s.max_body_bytes
        self.counts = {"requests": 0, "ok": 0, "errors": 0, "retries": 0}
        # Router-side latency of the last LATENCY_WINDOW answered requests (features +
        # generation + logging), for /stats and the dashboard.
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        # The same as Prometheus metrics (a counter, a histogram) that add up over replicas.
        self.metrics = RouterMetrics()
        self.features.warm_up()

    async def reconfigure(self, user_config: dict) -> None:
        """Inline: each arm's engine to its version (an arm whose version does not load
        keeps the one it serves; the others go on), and an optional ``"max_batch"``."""
        user_config = user_config or {}
        versions = user_config.get("versions") or {}
        for arm, engine in self.engines.items():
            engine.set_max_batch(user_config.get("max_batch"))
            await engine.set_version(versions.get(arm))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True, "arms": [a.name for a in self.experiment.arms]}

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        self.counts["requests"] += 1
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        arm = self.experiment.assign(body.user_id)
        feats = await self.features.user(body.user_id)
        event_ms = body.event_time_ms if body.event_time_ms is not None else int(time.time() * 1000)
        req = {
            "history": feats.history,
            "profile": feats.profile,  # descriptors of a context-trained model
            "request_time_s": event_ms / 1000,  # its hour and weekday
            "tags": body.context or {},  # entry point, device: read by a model trained on them
            "session_size": body.session_size,
            "exclude_seen": body.exclude_seen,
        }
        try:
            result = await self._generate(arm, req)
        except Exception as exc:
            self.counts["errors"] += 1
            self.metrics.error(arm)
            raise HTTPException(503, f"arm {arm} unavailable: {type(exc).__name__}") from exc
        if "error" in result:
            self.counts["errors"] += 1
            self.metrics.error(arm)
            raise HTTPException(503, result["error"])
        items = [ServedItem(**i) for i in result["items"]]
        version = result["model_version"]
        if items:
            self.impressions.offer(
                Impression(
                    event_time_ms=event_ms,
                    request_id=request_id,
                    user_id=body.user_id,
                    arm=arm,
                    model_version=version,
                    items=[i.model_dump() for i in items],
                    context={**(body.context or {}), "features": feats.source},
                )
            )
        self.dpo.offer(
            request_id,
            {
                "request_id": request_id,
                "user_id": body.user_id,
                "arm": arm,
                "model_version": version,
                "event_time_ms": event_ms,
                "history": feats.history,
                "profile": feats.profile,
                "tags": body.context or {},
                "items": [i.item_id for i in items],
            },
        )
        self.counts["ok"] += 1
        took_ms = (time.perf_counter() - started) * 1000
        self.latency_ms.append(took_ms)
        self.metrics.ok(arm, took_ms)
        return RecommendResponse(request_id=request_id, arm=arm, model_version=version, items=items)

    async def _generate(self, arm: str, req: dict) -> dict:
        """Ask the arm's engine (inline) or recommender (split); a replica that died with
        the request (killed, its node lost) is retried: generation has no side effect,
        and the handle holds the retry until Serve has a replica again. Other errors are
        not retried."""
        engine = self.engines.get(arm)
        if engine is not None:
            return await engine.generate(req)
        from ray.exceptions import RayActorError

        for attempt in range(GENERATE_ATTEMPTS):
            try:
                return await self.recommenders[arm].generate.remote(req)
            except RayActorError:
                if attempt == GENERATE_ATTEMPTS - 1:
                    raise
                self.counts["retries"] += 1
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @api.get("/arms", response_model=list[ArmInfo])
    async def arms(self) -> list[ArmInfo]:
        out = []
        for spec in self.experiment.arms:
            engine = self.engines.get(spec.name)
            if engine is not None:
                info = replica_info(self.replica, engine)
            else:
                info = await self.recommenders[spec.name].info.remote()
            out.append(
                ArmInfo(
                    arm=spec.name,
                    share=spec.share,
                    lineage=spec.lineage,
                    model_version=info["model_version"],
                    scoring=spec.scoring,
                    replicas=[info],
                )
            )
        return out

    @api.get("/stats")
    async def stats(self) -> dict:
        return {
            "router": self.counts,
            "features": self.features.stats(),
            "impressions": self.impressions.stats(),
            "dpo_mirror": self.dpo.counts,
            "latency_ms": latency_summary(self.latency_ms),
        }


# --------------------------------------------------------------------------- building
def current_versions(cfg: StackConfig) -> dict[str, str | None]:
    """Each arm's current version in the registry (None: not promoted yet)."""
    from recloop.experiment import load_experiment
    from recloop.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(cfg.registry_uri)
    out: dict[str, str | None] = {}
    for spec in load_experiment(cfg.serve.experiment).arms:
        try:
            out[spec.name] = registry.current(spec.name)
        except RegistryError:
            out[spec.name] = None
    return out


def build_app(cfg: StackConfig, versions: dict[str, str | None] | None = None):
    """The Serve application for ``cfg``: one Recommender per arm of the experiment, each
    on the version the registry says is current (or ``versions[arm]``)."""
    from recloop.experiment import load_experiment

    s = cfg.serve
    experiment = load_experiment(s.experiment)
    versions = {**current_versions(cfg), **(versions or {})}
    plain = service_config(cfg)
    if s.topology == "inline":
        return Router.options(
            num_replicas=inline_replicas(experiment),
            ray_actor_options=inline_actor_options(cfg),
            logging_config=logging_config(cfg),
            user_config=inline_user_config(experiment, versions),
        ).bind(plain, None)
    recommenders = {}
    for spec in experiment.arms:
        recommenders[spec.name] = Recommender.options(
            name=f"recommender-{spec.name}",
            num_replicas=spec.replicas,
            ray_actor_options=actor_options(s.replica_cpus, s.replica_resources),
            user_config={"version": versions.get(spec.name)},
            logging_config=logging_config(cfg),
        ).bind(plain, spec.name, spec.lineage, spec.scoring_options())
    return Router.options(
        ray_actor_options=actor_options(s.router_cpus, s.router_resources),
        logging_config=logging_config(cfg),
    ).bind(plain, recommenders)


def logging_config(cfg: StackConfig) -> dict[str, Any]:
    """Serve's logging of the service's replicas: access lines only when asked for
    (``serve.access_log``; ``/stats`` and the dashboard count the requests)."""
    return {"enable_access_log": cfg.serve.access_log}


def actor_options(cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """``ray_actor_options``: the CPU share, and custom resources only when some are asked
    for (so the default Serve config stays as it is checked in)."""
    out: dict[str, Any] = {"num_cpus": cpus}
    if resources:
        out["resources"] = dict(resources)
    return out


def inline_replicas(experiment: Any) -> int:
    """Router replicas of the inline topology: each hosts every arm, so as many as the
    arm that asks for most."""
    return max((a.replicas for a in experiment.arms), default=1)


def inline_user_config(experiment: Any, versions: dict[str, str | None]) -> dict[str, Any]:
    """The inline Router's ``user_config``: every arm's version (None: none yet)."""
    return {"versions": {a.name: versions.get(a.name) for a in experiment.arms}}


def inline_actor_options(cfg: StackConfig) -> dict[str, Any]:
    """An inline Router replica does the router's and one replica's work: their CPU
    shares added, and the custom resources of both (the larger where both name one)."""
    s = cfg.serve
    resources = dict(s.router_resources)
    for k, v in s.replica_resources.items():
        resources[k] = max(v, resources.get(k, 0.0))
    return actor_options(round(s.router_cpus + s.replica_cpus, 4), resources)


# Config sections the service does not read. They stay out of the application's args:
# Serve redeploys every replica when the args change, so a trainer promoting with its own
# train/dpo settings (two learning arms: two trainers) would restart the whole service.
NOT_SERVICE_CONFIG = ("train", "dpo", "ingest")


def service_config(cfg: StackConfig) -> dict:
    """``cfg`` as the service receives it: the sections it reads, the rest at defaults."""
    conf = cfg.to_dict()
    for section in NOT_SERVICE_CONFIG:
        conf.pop(section, None)
    return conf


def deploy_config(cfg: StackConfig, versions: dict[str, str | None] | None = None) -> dict:
    """The declarative Serve config of the service for ``cfg``, with each arm's model
    version (from the registry unless given) in its ``user_config``."""
    from recloop.experiment import load_experiment

    conf = render_serve_config(cfg)
    app = conf["applications"][0]
    app["args"] = {"config_dict": service_config(cfg)}
    versions = {**current_versions(cfg), **(versions or {})}
    for d in app["deployments"]:
        if d["name"] == "Router" and cfg.serve.topology == "inline":
            d["user_config"] = inline_user_config(load_experiment(cfg.serve.experiment), versions)
        arm = d["name"].removeprefix("recommender-")
        if arm in versions:
            d["user_config"] = {"version": versions[arm]}
    if cfg.serve.dashboard:  # the whole config, as JSON, like the service's
        from serving.dashboard import APP_NAME, dashboard_config

        dash = next(a for a in conf["applications"] if a["name"] == APP_NAME)
        dash["args"] = {"config_dict": dashboard_config(cfg)}
    # The HTTP options `recloop up` started Serve with: unchanged for a running Serve, and
    # the right port for one started again (after a shutdown) by this very deploy.
    conf["http_options"] = {"host": cfg.ray.host, "port": cfg.ray.serve_port}
    del conf["proxy_location"]
    return conf


def _serve_api(cfg: StackConfig) -> str:
    """Serve's declarative REST endpoint on the cluster's dashboard."""
    return f"http://{cfg.ray.host}:{cfg.ray.dashboard_port}/api/serve/applications/"


def deploy(cfg: StackConfig, timeout_s: float = 300.0, extra: dict | None = None) -> None:
    """Deploy the service, or update it in place, through Serve's declarative REST API.

    Declarative updates keep a deployment's code version when only its ``user_config``
    changed, so a promotion reaches the running replicas through ``reconfigure``
    instead of replacing them (``serve.run`` would start new replicas every time).
    ``extra``: keys added to every model deployment's ``user_config`` (``{"max_batch":
    1}`` sets the running replicas' batch limit in place)."""
    import requests

    conf = deploy_config(cfg)
    app = next(a for a in conf["applications"] if a["name"] == cfg.serve.app_name)
    for d in app["deployments"] if extra else []:
        if "user_config" in d:
            d["user_config"] = {**d["user_config"], **extra}
    resp = requests.put(_serve_api(cfg), json=conf, headers=auth_headers(cfg), timeout=60)
    if resp.status_code >= 400:
        raise RuntimeError(f"Serve refused the deploy config ({resp.status_code}): {resp.text}")
    expected = {d["name"]: d["user_config"] for d in app["deployments"] if "user_config" in d}
    wait_running(cfg, timeout_s, expected)


def app_status(cfg: StackConfig) -> dict:
    import requests

    resp = requests.get(_serve_api(cfg), headers=auth_headers(cfg), timeout=30)
    apps = resp.json().get("applications", {})
    return apps.get(cfg.serve.app_name) or {}


def _updated(app: dict, expected: dict[str, Any]) -> bool:
    """Every deployment of ``expected`` runs the ``user_config`` it names, on all its
    replicas (Serve reports the target config and HEALTHY once each replica has
    reconfigured)."""
    deps = app.get("deployments") or {}
    for name, user_config in expected.items():
        d = deps.get(name) or {}
        if (d.get("deployment_config") or {}).get("user_config") != user_config:
            return False
        if d.get("status") != "HEALTHY" or d.get("status_trigger") == "CONFIG_UPDATE_STARTED":
            return False
    return True


def wait_running(cfg: StackConfig, timeout_s: float, expected: dict | None = None) -> None:
    """Until the service runs; with ``expected`` ({deployment: user_config}), until every
    replica of those deployments runs that config (a promotion is served), polled every
    0.2 s. Without it, an update is awaited by its DEPLOYING state (or 3 s)."""
    deadline = time.monotonic() + timeout_s
    seen_deploying = False
    settle = time.monotonic() + 3.0  # an update may take a moment to show as DEPLOYING
    while True:
        app = app_status(cfg)
        status = app.get("status")
        seen_deploying |= status == "DEPLOYING"
        if status == "RUNNING" and expected is not None and _updated(app, expected):
            return
        if (
            status == "RUNNING"
            and expected is None
            and (seen_deploying or time.monotonic() > settle)
        ):
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"{cfg.serve.app_name} failed to deploy: {app.get('message')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cfg.serve.app_name} not running after {timeout_s:.0f} s: {app}")
        time.sleep(0.2)


def delete(cfg: StackConfig) -> None:
    """Remove every declaratively deployed application (the service) and keep Serve and
    its HTTP proxy running (a DELETE on the API would shut Serve down altogether)."""
    import requests

    conf = {"http_options": {"host": cfg.ray.host, "port": cfg.ray.serve_port}}
    resp = requests.put(
        _serve_api(cfg), json={**conf, "applications": []}, headers=auth_headers(cfg), timeout=60
    )
    if resp.status_code >= 400:
        raise RuntimeError(f"Serve refused to remove the applications: {resp.text}")


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve deploy infra/serve/config.yaml``: ``args`` may name a run
    file (``config``) and dotted overrides (``overrides``); versions come from the
    registry, as with ``recloop serve``."""
    from recloop.config import load_config

    if args.get("config_dict"):  # what `deploy` sends: the whole config, as JSON
        return build_app(StackConfig.from_dict(args["config_dict"]))
    cfg = load_config(args.get("config"), overrides=args.get("overrides") or {})
    return build_app(cfg)


def render_serve_config(cfg: StackConfig, run_file: str | None = None) -> dict[str, Any]:
    """The Serve deploy config equivalent to ``recloop serve`` for this experiment
    (``infra/serve/config.yaml`` is this, for the defaults; a test keeps them equal).
    ``run_file``: the run file the applications load where they run (e.g. a mounted
    ConfigMap on Kubernetes); None = the defaults and the environment."""
    from recloop.experiment import load_experiment

    s = cfg.serve
    experiment = load_experiment(s.experiment)
    if s.topology == "inline":
        deployments: list[dict[str, Any]] = [
            {
                "name": "Router",
                "num_replicas": inline_replicas(experiment),
                "ray_actor_options": inline_actor_options(cfg),
            }
        ]
    else:
        router = actor_options(s.router_cpus, s.router_resources)
        deployments = [{"name": "Router", "ray_actor_options": router}]
        deployments += [
            {
                "name": f"recommender-{spec.name}",
                "num_replicas": spec.replicas,
                "ray_actor_options": actor_options(s.replica_cpus, s.replica_resources),
            }
            for spec in experiment.arms
        ]
    applications = [
        {
            "name": s.app_name,
            "route_prefix": "/",
            "import_path": "serving.app:app_builder",
            "args": {"config": None, "overrides": {}},
            "logging_config": logging_config(cfg),
            "deployments": deployments,
        }
    ]
    if s.dashboard:
        from serving.dashboard import dashboard_app_config

        applications.append(dashboard_app_config(cfg))
    for app in applications:
        app["args"]["config"] = run_file
    return {
        "proxy_location": s.proxy_location,
        "http_options": {"host": "0.0.0.0", "port": cfg.ray.serve_port},
        "applications": applications,
    }
