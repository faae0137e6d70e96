"""Observe, compare, heal: which Serve applications are ours, and which of ours Ray Serve no longer runs as applied. Pure.

Sits between observe and apply in a tick. Every application this controller
renders carries an owner mark (`OWNER_KEY` in each deployment's `user_config`,
a lightweight option: marking never restarts a replica). `partition` splits
what Ray Serve reports into our applications and the others; the others are
carried unchanged in every PUT (the Serve REST API replaces the whole set) and
their names are never taken over (`holder`). `find_drift` compares what we
applied with what Ray reports (`deployed_app_config`: the submitted config,
only the options that were set) on the fields that matter, normalized.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.state.records import ObservedApp

__all__ = ["APP_FIELDS", "DEPLOYMENT_FIELDS", "OWNER_KEY", "Drift", "carried", "differences", "essence", "find_drift", "holder", "mark",
           "owner_of", "partition", "release_of"]

OWNER_KEY = "owner"
APP_FIELDS = ("import_path", "route_prefix", "args")
DEPLOYMENT_FIELDS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "ray_actor_options", "user_config")


@dataclass(frozen=True)
class Drift:
    app: str
    what: str  # what differed, for the log line

    @property
    def release(self) -> str:
        return release_of(self.app)


def release_of(app: str) -> str:
    """`demo` for the router `demo` and the version app `demo--<version>`."""
    return app.split("--", 1)[0]


def mark(app: dict[str, Any], owner: str) -> dict[str, Any]:
    """The app config with the owner mark in every deployment's user_config."""
    deployments = [{**d, "user_config": {**(d.get("user_config") or {}), OWNER_KEY: owner}} for d in app.get("deployments", [])]
    return {**app, "deployments": deployments}


def owner_of(config: dict[str, Any] | None) -> str | None:
    """The owner mark of a deployed app config, or None (unmarked, or deployed without a config)."""
    for deployment in (config or {}).get("deployments") or []:
        owner = (deployment.get("user_config") or {}).get(OWNER_KEY) if isinstance(deployment, dict) else None
        if isinstance(owner, str):
            return owner
    return None


def partition(observed: dict[str, ObservedApp], owner: str, recorded: set[str]) -> tuple[dict[str, ObservedApp], dict[str, ObservedApp]]:
    """(ours, others). Ours: marked with our id, or unmarked but recorded as ours (deployed before owner marks)."""
    ours: dict[str, ObservedApp] = {}
    others: dict[str, ObservedApp] = {}
    for name, app in observed.items():
        mark_ = owner_of(app.config)
        (ours if mark_ == owner or (mark_ is None and name in recorded) else others)[name] = app
    return ours, others


def holder(release: str, others: dict[str, ObservedApp]) -> str | None:
    """A refusal naming who holds an application name this release needs, or None when every name is free."""
    for name, app in sorted(others.items()):
        if app.status == "DELETING":  # going away: nobody's to hold
            continue
        if name == release or name.startswith(f"{release}--"):
            who = owner_of(app.config)
            by = (f"controller {who!r} (another state dir on this Ray cluster)" if who
                  else "another Ray Serve client (no diffops owner mark)")
            return (f"Ray Serve application {name!r} belongs to {by}; it is left untouched and this release is not deployed; "
                    f"next: rename the release, or remove it from that controller, or delete that application")
    return None


def carried(others: dict[str, ObservedApp]) -> list[dict[str, Any]]:
    """Other owners' applications as Ray reports them, to PUT back unchanged; those being deleted stay deleted."""
    return [app.config for name, app in sorted(others.items()) if app.config is not None and app.status != "DELETING"]


def _normal(value: Any) -> Any:
    """Numbers compare as floats (Ray reports 2 as 2.0 where the schema says float); None equals absent."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def essence(app: dict[str, Any]) -> dict[str, Any]:
    """The fields of an app config that decide what serves, normalized."""
    deployments = {d.get("name"): {f: d.get(f) for f in DEPLOYMENT_FIELDS} for d in app.get("deployments") or []}
    normal: dict[str, Any] = _normal({**{f: app.get(f) for f in APP_FIELDS}, "deployments": deployments})
    return normal


def differences(applied: Any, deployed: Any, path: str = "") -> list[str]:
    """`field: applied -> deployed` for each leaf that differs (both normalized by `essence`)."""
    if isinstance(applied, dict) and isinstance(deployed, dict):
        out: list[str] = []
        for key in sorted(applied.keys() | deployed.keys(), key=str):
            out += differences(applied.get(key), deployed.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if applied == deployed else [f"{path}: {_short(applied)} -> {_short(deployed)}"]


def _short(value: Any) -> str:
    text = "absent" if value is None else repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def find_drift(applied: Iterable[dict[str, Any]], ours: dict[str, ObservedApp]) -> list[Drift]:
    """Our applied apps that Ray Serve no longer runs as applied: missing, being deleted, or changed."""
    drifts = []
    for app in applied:
        name = app["name"]
        seen = ours.get(name)
        if seen is None:
            drifts.append(Drift(name, "missing from Ray Serve"))
        elif seen.status == "DELETING":
            drifts.append(Drift(name, "being deleted by Ray Serve"))
        elif seen.config is None:
            drifts.append(Drift(name, "Ray Serve reports no deployed config for it"))
        else:
            changed = differences(essence(app), essence(seen.config))
            if changed:
                shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
                drifts.append(Drift(name, f"changed: {shown}"))
    return drifts
