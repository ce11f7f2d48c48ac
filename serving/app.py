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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from recloop.config import StackConfig
from recloop.events import MAX_EVENT_TIME_MS, Impression
from recloop.inference import BaselineModel, LoadedModel
from recloop.priority import lower_this_thread
from recloop.ray_head import auth_headers
from serving.batcher import ContinuousBatcher

log = logging.getLogger("recloop.serve")

NAMESPACE = "recloop"
MAX_CONTEXT_KEYS = 16
# A request with no history: what a replica generates once for a new version before it
# swaps it in.
WARM_REQUEST = {
    "history": [],
    "profile": {},
    "tags": {},
    "session_size": None,
    "exclude_seen": True,
}


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
# A checkpoint's served form (LoadedModel, BaselineModel) is recloop.inference's, which
# the training gate and the DPO sampler load too; imported above (and re-exported).
@serve.deployment(max_ongoing_requests=64, health_check_period_s=5)
class Recommender:
    """One arm's model. ``user_config = {"version": ...}`` selects the registry version."""

    def __init__(self, cfg: dict, arm: str, lineage: str, scoring: dict | None = None) -> None:
        from serving.registry import ModelRegistry

        self.scoring = dict(scoring or {"scoring": "beam"})
        self.cfg = StackConfig.from_dict(cfg)
        torch.set_num_threads(self.cfg.serve.torch_threads)
        self.arm, self.lineage = arm, lineage
        self.registry = ModelRegistry(self.cfg.registry_uri)
        self.model: LoadedModel | BaselineModel | None = None
        self.load_error: str | None = None
        self.swaps = 0
        # Anchor popularity of a context-trained model: Feast's clicks, re-read off the
        # request path every serve.anchor_refresh_s.
        self._store: Any = None
        self._anchor_task: asyncio.Task | None = None
        self.anchors: dict[str, Any] = {"items_clicked": 0, "refreshed_at": None, "error": None}
        self.batcher = ContinuousBatcher(self._run_batch, self.cfg.serve.max_batch_size)
        # New versions load on a thread of their own at background priority: a promotion
        # shares the replica's CPU with its requests, and the requests come first.
        self._loader = ThreadPoolExecutor(
            1,
            thread_name_prefix="model-load",
            initializer=lower_this_thread,
            initargs=(self.cfg.priority.background_nice,),
        )
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]

    async def reconfigure(self, user_config: dict) -> None:
        version = (user_config or {}).get("version")
        if not version or (self.model is not None and self.model.version == version):
            return
        try:  # load beside the serving model; swap only a complete, valid one
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(self._loader, self._load, version)
        except Exception as exc:
            self.load_error = f"{version}: {type(exc).__name__}: {exc}"[:500]
            log.error("arm %s: keeping %s, cannot load %s", self.arm, self.version(), exc)
            if self.model is None:  # a new replica has nothing to keep: the last good one
                await loop.run_in_executor(self._loader, self._fall_back, version)
                self._keep_anchors_fresh()
            return
        self.model = loaded  # one reference assignment: atomic for requests
        self.load_error = None
        self.swaps += 1
        self._keep_anchors_fresh()

    def _keep_anchors_fresh(self) -> None:
        if self._anchor_task is None and _has_anchors(self.model):
            self._anchor_task = asyncio.get_running_loop().create_task(self._refresh_anchors())

    def _load(self, version: str) -> LoadedModel:
        path = self.registry.fetch(self.lineage, version)
        loaded = LoadedModel.load(str(path), version, self.scoring.get("scoring", "beam"))
        if _has_anchors(loaded):  # swapped in with live popularity, not last training's
            self._read_popularity(loaded)
        # One generation before the swap: the decode-time weight layouts are built here,
        # not by the first requests on the new version, and a version that cannot answer
        # is never swapped in.
        loaded.generate([dict(WARM_REQUEST, request_time_s=time.time())], 1, self.scoring)
        return loaded

    def _read_popularity(self, model: LoadedModel) -> None:
        """Add Feast's item clicks to ``model``'s anchor popularity; a store that cannot
        be read leaves it as it was (the checkpoint's counts at first) and is reported."""
        from features.reads import item_clicks

        try:
            if self._store is None:
                from features.store import open_store

                self._store = open_store(self.cfg)
            clicked = model.update_popularity(item_clicks(self._store, model.to_data[1:]))
        except Exception as exc:
            self.anchors["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return
        self.anchors.update(
            {"items_clicked": clicked, "refreshed_at": time.time(), "version": model.version}
        )
        self.anchors["error"] = None

    async def _refresh_anchors(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.anchor_refresh_s)
            model = self.model
            if _has_anchors(model):
                await asyncio.to_thread(self._read_popularity, model)

    def _fall_back(self, failed: str) -> None:
        """A replica started (restarted, scaled up) after its version went bad: serve the
        newest version of the arm's history that still verifies and loads, the registry's
        current one first, as the replicas that were running already do."""
        try:
            candidates = [
                self.registry.current(self.arm),
                *reversed(self.registry.served(self.arm)),
            ]
        except Exception as exc:
            log.error("arm %s: no fallback, the registry is unreadable: %s", self.arm, exc)
            return
        for version in dict.fromkeys(v for v in candidates if v and v != failed):
            try:
                self.model = self._load(version)
            except Exception as exc:
                log.error("arm %s: fallback %s does not load either: %s", self.arm, version, exc)
                continue
            self.load_error = f"{self.load_error}; serving {version} instead"[:500]
            self.swaps += 1
            return

    def version(self) -> str | None:
        return None if self.model is None else self.model.version

    def _run_batch(self, requests: list[dict]) -> list[dict]:
        """One batched generation (in the batcher's worker thread)."""
        model = self.model  # the whole batch runs on one model
        if model is None:
            err = {"error": f"arm {self.arm!r} has no model version yet (promote one)"}
            return [err for _ in requests]
        return model.generate(requests, self.cfg.serve.beam_width, self.scoring)

    async def generate(self, request: dict) -> dict:
        return await self.batcher.submit(request)

    def info(self) -> dict:
        return {
            "replica": self.replica,
            "model_version": self.version(),
            "scoring": self.scoring.get("scoring", "beam"),
            "load_error": self.load_error,
            "swaps": self.swaps,
            **self.batcher.stats(),  # batches, mean_batch, queued, busy
            "cpu_s": time.process_time(),  # the replica process's CPU time so far
            "context": self._context_info(),
        }

    def _context_info(self) -> dict | None:
        """What a context-trained model reads per request (None: no context)."""
        ctx = getattr(self.model, "context", None)
        if ctx is None:
            return None
        out: dict[str, Any] = {"fields": list(ctx.fields), "anchors": ctx.anchors}
        if ctx.anchors:
            out["popularity"] = dict(self.anchors)
        return out


def _has_anchors(model: Any) -> bool:
    ctx = getattr(model, "context", None)
    return ctx is not None and ctx.anchors > 0


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


@api.middleware("http")
async def _bounded_body(request: Request, call_next):  # noqa: ANN001
    """Refuse oversized bodies before parsing them (413 with the limit)."""
    limit = _MAX_BODY[0]
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
    return await call_next(request)


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(api)
class Router:
    def __init__(self, cfg: dict, recommenders: dict[str, DeploymentHandle]) -> None:
        from serving.experiment import load_experiment
        from serving.features import FeatureClient
        from serving.impressions import ImpressionLogger

        self.cfg = StackConfig.from_dict(cfg)
        s = self.cfg.serve
        self.experiment = load_experiment(s.experiment)
        self.recommenders = recommenders
        self.features = FeatureClient(self.cfg, timeout_s=s.feature_timeout_s)
        self.impressions = ImpressionLogger(self.cfg.kafka.bootstrap, s.impression_buffer)
        self.dpo = DpoMirror(s.dpo_actor, s.dpo_fraction)
        _MAX_BODY[0] = s.max_body_bytes
        self.counts = {"requests": 0, "ok": 0, "errors": 0, "retries": 0}
        # Router-side latency of the last LATENCY_WINDOW answered requests (features +
        # generation + logging), for /stats and the dashboard.
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.features.warm_up()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True, "arms": list(self.recommenders)}

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
            raise HTTPException(503, f"arm {arm} unavailable: {type(exc).__name__}") from exc
        if "error" in result:
            self.counts["errors"] += 1
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
        self.latency_ms.append((time.perf_counter() - started) * 1000)
        return RecommendResponse(request_id=request_id, arm=arm, model_version=version, items=items)

    async def _generate(self, arm: str, req: dict) -> dict:
        """Ask the arm's recommender; a replica that died with the request (killed, its
        node lost) is retried: generation has no side effect, and the handle holds the
        retry until Serve has a replica again. Other errors are not retried."""
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
    from serving.experiment import load_experiment
    from serving.registry import ModelRegistry, RegistryError

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
    from serving.experiment import load_experiment

    s = cfg.serve
    experiment = load_experiment(s.experiment)
    versions = {**current_versions(cfg), **(versions or {})}
    plain = service_config(cfg)
    recommenders = {}
    for spec in experiment.arms:
        recommenders[spec.name] = Recommender.options(
            name=f"recommender-{spec.name}",
            num_replicas=spec.replicas,
            ray_actor_options=actor_options(s.replica_cpus, s.replica_resources),
            user_config={"version": versions.get(spec.name)},
        ).bind(plain, spec.name, spec.lineage, spec.scoring_options())
    return Router.options(ray_actor_options=actor_options(s.router_cpus, s.router_resources)).bind(
        plain, recommenders
    )


def actor_options(cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """``ray_actor_options``: the CPU share, and custom resources only when some are asked
    for (so the default Serve config stays as it is checked in)."""
    out: dict[str, Any] = {"num_cpus": cpus}
    if resources:
        out["resources"] = dict(resources)
    return out


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
    conf = render_serve_config(cfg)
    app = conf["applications"][0]
    app["args"] = {"config_dict": service_config(cfg)}
    versions = {**current_versions(cfg), **(versions or {})}
    for d in app["deployments"]:
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


def deploy(cfg: StackConfig, timeout_s: float = 300.0) -> None:
    """Deploy the service, or update it in place, through Serve's declarative REST API.

    Declarative updates keep a deployment's code version when only its ``user_config``
    changed, so a promotion reaches the running replicas through ``reconfigure``
    instead of replacing them (``serve.run`` would start new replicas every time)."""
    import requests

    conf = deploy_config(cfg)
    resp = requests.put(_serve_api(cfg), json=conf, headers=auth_headers(cfg), timeout=60)
    if resp.status_code >= 400:
        raise RuntimeError(f"Serve refused the deploy config ({resp.status_code}): {resp.text}")
    app = next(a for a in conf["applications"] if a["name"] == cfg.serve.app_name)
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
    from serving.experiment import load_experiment

    s = cfg.serve
    experiment = load_experiment(s.experiment)
    deployments: list[dict[str, Any]] = [
        {"name": "Router", "ray_actor_options": actor_options(s.router_cpus, s.router_resources)}
    ]
    for spec in experiment.arms:
        deployments.append(
            {
                "name": f"recommender-{spec.name}",
                "num_replicas": spec.replicas,
                "ray_actor_options": actor_options(s.replica_cpus, s.replica_resources),
            }
        )
    applications = [
        {
            "name": s.app_name,
            "route_prefix": "/",
            "import_path": "serving.app:app_builder",
            "args": {"config": None, "overrides": {}},
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
