"""Render the complete Ray Serve config from recorded state. Pure.

The apply step PUTs this whole document; Ray Serve leaves applications whose
config did not change untouched. Each live version is an application
`<release>--<version>` with no route; each release has a router application at
`/<release>` whose `user_config` holds the weights and limits. A version app's
`args` and resources hold only version fields, so light changes (replica count,
queue sizes, batch size) and weight moves reach running replicas as
lightweight updates, never restarts. Every app carries this controller's owner
mark in its deployments' `user_config` (`controller.apply.drift`), also lightweight,
and pins the serving code in its `runtime_env` (`serving.code_pin`); on a cluster
that runs containers (`--container-runtime podman`) a version app's `runtime_env`
also names the release's `runtime.image` as its `image_uri`, so its replicas run in
the image the release pins. Where replicas read models from is
`controller.apply.model_store.Placement`'s decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from controller.apply.drift import mark
from controller.apply.model_store import Placement
from controller.parse.release import Spec, pinned_models
from controller.rollout.capacity import effective_replicas
from controller.state.records import ReleaseRecord, VersionRecord
from serving.code_pin import PIN_ENV
from serving.schema import ModelSpec, SafetySpec

__all__ = ["GRACEFUL_SHUTDOWN_S", "MODEL_IMPORT", "ROUTER_CPUS", "ROUTER_IMPORT", "ROUTER_MAX_ONGOING",
           "ContainerRuntime", "ProxyLocation", "RenderSettings", "default_controller_id", "model_app",
           "render", "rendered_versions", "router_app", "router_weights"]

MODEL_IMPORT = "serving.model_server:build_model_app"
ROUTER_IMPORT = "serving.router:build_router_app"
ROUTER_CPUS = 0.05
ROUTER_MAX_ONGOING = 1024
ProxyLocation = Literal["HeadOnly", "EveryNode"]
ContainerRuntime = Literal["none", "podman"]
GRACEFUL_SHUTDOWN_S = 60


@dataclass(frozen=True)
class RenderSettings:
    repo: str  # local path of the release repository (work tree or mirror); replicas read it only on a local cluster
    cache_dir: str  # the controller's model cache; shared with replicas only on a local cluster
    http_host: str = "127.0.0.1"  # `--http-host`: where Serve's proxies listen
    http_port: int = 8000
    owner: str = "diffops"  # this controller's id (`--controller-id`), marked on every app it renders
    placement: Placement = field(default_factory=Placement)  # `--model-store`, and whether the cluster is this machine
    proxy_location: ProxyLocation = "HeadOnly"  # `--proxy-location`: EveryNode on a cluster
    serving_code: str | None = None  # `serving.code_pin.fingerprint()` of this controller: every app's nodes must run it
    container_runtime: ContainerRuntime = "none"  # `--container-runtime`: podman runs each version's replicas in its image
    serving_metrics: bool = True  # `--serving-metrics off`: routers and replicas record no request metrics (user_config)


def default_controller_id(state_dir: str) -> str:
    """A stable id per state dir (its resolved path, hashed): the same after a restart, different for another dir."""
    import hashlib
    from pathlib import Path

    return "diffops-" + hashlib.sha256(str(Path(state_dir).expanduser().resolve()).encode()).hexdigest()[:12]


def model_app(version: VersionRecord, settings: RenderSettings) -> dict[str, Any]:
    """The version's application, from its record (whose light fields follow the release while it is desired)."""
    spec, placement = version.spec, settings.placement
    replicas = spec.replicas
    return {
        "name": version.app,
        "route_prefix": None,
        "import_path": MODEL_IMPORT,
        "args": version.deployed_args or {
            "release": version.release,
            "version": version.version,
            "model": placement.for_replicas(spec.model).model_dump(mode="json"),
            "generation": spec.generation.model_dump(mode="json"),
            "repo": settings.repo if any(placement.reads_repo(m) for what, m in pinned_models(spec) if what != "CLIP model") else None,
            "commit": version.commit,
            "cache_dir": settings.cache_dir if placement.local else None,  # None: the node's own (DIFFOPS_CACHE_DIR)
            "gpus": replicas.gpus,
            "faults": spec.faults.model_dump(mode="json") if spec.faults is not None else None,
            **({"safety": safety_pin(spec.quality.safety, settings)} if spec.quality.safety is not None else {}),
        },
        "deployments": [
            {
                "name": "Model",
                "num_replicas": effective_replicas(version),
                "max_ongoing_requests": replicas.max_ongoing_requests,
                "max_queued_requests": replicas.max_queued_requests,
                "ray_actor_options": {"num_cpus": replicas.cpus, "num_gpus": replicas.gpus},
                "user_config": {
                    "max_batch_size": replicas.max_batch_size,
                    "batch_wait_timeout_s": replicas.batch_wait_timeout_s,
                },
                "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
                "graceful_shutdown_wait_loop_s": 1,
                "health_check_period_s": 10,
                "health_check_timeout_s": 60,
            }
        ],
    }


def safety_pin(safety: SafetySpec, settings: RenderSettings) -> dict[str, Any]:
    """The safety checker as a version's replicas fetch it, and its action."""
    model = settings.placement.for_replicas(ModelSpec(uri=safety.uri, digest=safety.digest))
    return {"uri": model.uri, "digest": model.digest, "action": safety.action}


def scorer_config(release: ReleaseRecord, spec: Spec, settings: RenderSettings) -> dict[str, Any]:
    """The scorer's `user_config`: the CLIP pin as its replica fetches it (from the model store when published)."""
    clip = spec.quality.clip
    if clip is None:
        return {"clip": None}
    model = settings.placement.for_replicas(ModelSpec(uri=clip.uri, digest=clip.digest))
    return {"clip": {"uri": model.uri, "digest": model.digest},
            "repo": settings.repo if settings.placement.reads_repo(model) else None, "commit": release.desired_commit,
            "cache_dir": settings.cache_dir if settings.placement.local else None}


def router_app(release: ReleaseRecord, versions: list[VersionRecord], settings: RenderSettings) -> dict[str, Any]:
    """The release's router application: its route, and the weights and limits in its `user_config` (lightweight);
    its scorer when the release samples outputs (quality.review, quality.clip)."""
    spec = release.spec or versions[0].spec
    quality = spec.quality
    sampled = quality.review.sample_rate > 0 or quality.clip is not None
    scorer = [{"name": "Scorer", "user_config": scorer_config(release, spec, settings)}] if sampled else []
    return {
        "name": release.name,
        "route_prefix": f"/{release.name}",
        "import_path": ROUTER_IMPORT,
        "args": {"release": release.name, **({"scorer": True} if sampled else {})},
        "deployments": [
            {
                "name": "Router",
                "num_replicas": spec.ingress.replicas,
                "max_ongoing_requests": ROUTER_MAX_ONGOING,
                "ray_actor_options": {"num_cpus": ROUTER_CPUS},
                "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,  # requests it forwards finish when the release goes
                "graceful_shutdown_wait_loop_s": 1,
                "user_config": {
                    "weights": router_weights(versions),
                    "limits": spec.limits.model_dump(mode="json"),
                    "defaults": {"width": spec.generation.width, "height": spec.generation.height},
                    "retry_after_s": 1,
                    **({"quality": {"review_rate": quality.review.sample_rate,
                                    "clip_rate": quality.clip.sample_rate if quality.clip is not None else 0.0}} if sampled else {}),
                },
            },
            *scorer,
        ],
    }


def router_weights(versions: Iterable[VersionRecord]) -> dict[str, int]:
    """Version -> weight for every version that has a Serve app: what the router is told, and must answer back."""
    return {v.version: v.weight for v in rendered_versions(versions)}


def rendered_versions(versions: Iterable[VersionRecord]) -> list[VersionRecord]:
    """Versions that have a Serve app: everything past preparation, aborted canaries until they retire."""
    return [v for v in versions if v.status in ("starting", "ready", "retiring")]


def _pinned(app: dict[str, Any], settings: RenderSettings, image: str | None = None) -> dict[str, Any]:
    """The app with what its replicas run pinned in its runtime_env: the serving code (a node running other code
    refuses to start it) and, for a version app on a container runtime, the release's image (Ray starts the
    replicas in it; `image_uri` combines only with `env_vars`, which is all else an app carries)."""
    runtime_env: dict[str, Any] = {}
    if image is not None and settings.container_runtime == "podman":
        runtime_env["image_uri"] = image
    if settings.serving_code is not None:
        runtime_env["env_vars"] = {PIN_ENV: settings.serving_code}
    return {**app, "runtime_env": runtime_env} if runtime_env else app


def _recording(app: dict[str, Any], settings: RenderSettings) -> dict[str, Any]:
    """The app with request metrics off in every deployment's user_config when the controller says so (lightweight)."""
    if settings.serving_metrics:
        return app
    return {**app, "deployments": [{**d, "user_config": {**d["user_config"], "metrics": False}} for d in app["deployments"]]}


def render(releases: Iterable[ReleaseRecord], versions: Iterable[VersionRecord], settings: RenderSettings) -> dict[str, Any]:
    """The complete Serve config: every release's router and live versions, each marked with this controller's owner id."""
    by_release: dict[str, list[VersionRecord]] = {}
    for version in sorted(rendered_versions(versions), key=lambda v: (v.release, v.version)):
        by_release.setdefault(version.release, []).append(version)
    applications = []
    for release in sorted(releases, key=lambda r: r.name):
        live = by_release.get(release.name)
        if not live:
            continue
        applications.append(_pinned(_recording(mark(router_app(release, live, settings), settings.owner), settings), settings))
        applications += [_pinned(_recording(mark(model_app(version, settings), settings.owner), settings), settings,
                                 version.spec.runtime.image) for version in live]
    return {
        "proxy_location": settings.proxy_location,
        "http_options": {"host": settings.http_host, "port": settings.http_port},
        "applications": applications,
    }
