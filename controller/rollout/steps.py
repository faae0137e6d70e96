"""One release's rollout, one tick at a time. Pure.

`step()` takes what git wants (or the file's errors), what is recorded, what
Ray Serve reports and which model preparations finished, and returns the next
recorded state, the decisions made (events) and the preparations to start.
Blue/green: a new version is prepared (model fetched and verified), started
beside the stable one with weight 0, switched to 100% once every replica is
running and warmed, and the old stable stays warm as `standby` for
`scale_down_delay`. With `rollout.post_promotion`, the new version is then
watched at 100% (`controller.rollout.post_promotion`) and a failed watch
switches traffic back to the standby at once. A desired version that is the
standby is switched back at once: no reload, no re-check. Nothing here blocks;
unfinished work waits for the next tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from controller.apply.serve_config import router_weights
from controller.parse.release import Release, Spec
from controller.rollout import canary as canary_walk
from controller.rollout import post_promotion
from controller.rollout.capacity import Resources, per_replica, shortfall
from controller.rollout.outcomes import Abort, Continue, Desired, Prepared, Promote, StepResult
from controller.rollout.surge import Surge
from controller.state.records import Command, Event, ObservedApp, Phase, ReleaseRecord, Role, VersionRecord, app_name, with_phase
from serving.fields import format_duration

__all__ = ["DEADLINE_LOAD_FACTOR", "DEADLINE_MARGIN_S", "NO_REPLICA_FAIL_S", "Desired", "Prepared", "StepResult", "deadline_s",
           "invalid", "removed", "role_of", "step"]

DEADLINE_LOAD_FACTOR = 3
DEADLINE_MARGIN_S = 30
NO_REPLICA_FAIL_S = 60  # a serving version with no replica running this long is Failed (a lost node), not a replacement


def deadline_s(release: Release, load_seconds: float | None) -> float:
    """The progress deadline, stretched to the measured load time of earlier versions."""
    floor = release.spec.rollout.progress_deadline.total_seconds()
    if load_seconds is None:
        return floor
    return max(floor, DEADLINE_LOAD_FACTOR * load_seconds + DEADLINE_MARGIN_S)


def role_of(versions: Sequence[VersionRecord], role: Role) -> list[VersionRecord]:
    """The versions that have this role (at most one stable, one canary, one standby)."""
    return [v for v in versions if v.role == role]


def invalid(record: ReleaseRecord | None, name: str, errors: list[str], versions: list[VersionRecord], now: float) -> StepResult:
    """The release file does not validate: report it, change nothing that serves."""
    serving = role_of(versions, "stable")
    tail = f"; {serving[0].version} keeps serving" if serving else "; nothing was serving"
    message = "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "") + tail
    record = record or ReleaseRecord(name, "Invalid", "", None, None, None, now)
    events = [] if record.phase == "Invalid" and record.message == message else [Event(name, "invalid", message)]
    return StepResult(with_phase(record, "Invalid", message, now), versions, events)


def removed(record: ReleaseRecord, versions: list[VersionRecord], allowed: bool, now: float) -> StepResult:
    """The release file is gone: delete its apps, unless every release file is gone and pruning all is not allowed."""
    if not allowed:
        message = "release file removed, but so is every other release: pruning all needs --allow-prune-all; still serving"
        return StepResult(with_phase(record, record.phase, message, now), versions)
    live = ", ".join(v.version for v in versions) or "none"
    return StepResult(None, [], [Event(record.name, "pruned", f"release file removed; deleting its apps (versions: {live})")])


def step(name: str, now: float, desired: Desired, record: ReleaseRecord | None, versions: list[VersionRecord],
         observed: dict[str, ObservedApp], prepared: dict[str, Prepared], stats: dict[str, canary_walk.Figures] | None = None,
         commands: Sequence[Command] = (), free: Resources | None = None) -> StepResult:
    """Advance one valid release toward its desired version."""
    rollout = desired.release.spec.rollout
    spec = desired.release.spec
    record = replace(
        record or ReleaseRecord(name, "Progressing", "", None, None, None, now),
        desired_commit=desired.commit, desired_version=desired.version, spec=spec,
    )
    out = StepResult(record, list(versions))
    target = desired.version
    for command in commands:
        if command.action == "retry" and record.failed_version:
            out.release = replace(record, failed_version=None, held_fingerprint=None)
            out.events.append(Event(name, "retry", f"{command.who} asked to retry {record.failed_version}; its hold is lifted",
                                    record.failed_version))
    assert out.release is not None
    record = out.release
    stable = next(iter(role_of(out.versions, "stable")), None)
    post_promotion.end_stale(out, stable, target, desired)
    _expire_standbys(out, rollout.scale_down_delay.total_seconds(), now, keep=post_promotion.kept_standby(out.release))
    _abandon_other_canaries(out, target)
    current = {v.version: v for v in out.versions if v.status != "retiring"}
    stable = next(iter(role_of(out.versions, "stable")), None)

    if stable is not None and stable.version == target:
        _follow_light_changes(out, stable, spec)
        if stable.gate_key not in (None, desired.gate_key):
            return _recheck(out, stable, prepared.get(target), desired, now)
        if post_promotion.watched(out.release) == target:
            stable = next(v for v in out.versions if v.version == target)
            manual = [c for c in commands if c.action != "retry"]
            return _watch(out, stable, desired, observed, stats, manual, now)
        return _healthy(out, target, observed, now)
    if target in current and current[target].role == "standby" and current[target].status == "ready":
        return _switch(out, current[target], stable, now, rollback=True)
    if record.failed_version == target and record.held_fingerprint == desired.fingerprint:
        return out  # held: not retried until the release file changes or `diffops retry`
    canary = current.get(target)
    if canary is None:
        canary = VersionRecord(name, target, "canary", 0, "preparing", desired.commit, spec, now, gate_key=desired.gate_key)
        out.versions = [v for v in out.versions if v.version != target] + [canary]  # a retiring attempt makes way
        out.events.append(Event(name, "rollout-started", f"rolling out {target} ({rollout.strategy}) from {desired.commit[:12]}; "
                                "next: verify the model and run the checks", target, desired.commit))
    if any(c.action == "abort" for c in commands) and canary.status != "ready":
        who = next(c.who for c in commands if c.action == "abort")
        return _fail(out, canary, f"aborted by {who}", desired, now)
    if canary.status in ("preparing", "verified"):
        return _preparing(out, canary, prepared.get(target), desired, now, free)
    if canary.replicas is not None:
        return _surge(out, canary, stable, observed.get(canary.app), observed.get(name), free, now)
    if canary.status == "starting":
        out = _starting(out, canary, stable, observed.get(canary.app), desired, now)
        canary = next((v for v in out.versions if v.version == target and v.role == "canary"), None)
        if canary is None or canary.status != "ready":
            return out
    return _walk(out, canary, stable, desired, observed.get(name), stats, [c for c in commands if c.action != "retry"], now)


def _surge(out: StepResult, canary: VersionRecord, stable: VersionRecord | None, app: ObservedApp | None,
           router: ObservedApp | None, free: Resources | None, now: float) -> StepResult:
    surge = Surge(out, canary, stable, now)
    match surge.advance(app, router, free):
        case Promote():
            return _switch(out, replace(surge.canary, replicas=None), None, now, rollback=False)  # the old version already left
        case Continue():
            return out


def _walk(out: StepResult, canary: VersionRecord, stable: VersionRecord | None, desired: Desired, router: ObservedApp | None,
          stats: dict[str, canary_walk.Figures] | None, commands: list[Command], now: float) -> StepResult:
    assert out.release is not None
    if stable is None or desired.release.spec.rollout.strategy != "canary":  # the strategy changed mid-walk
        out.release = replace(out.release, step=None, step_started_at=None)
        return _switch(out, canary, stable, now, rollback=False)
    walk = canary_walk.Walk(out, canary, stable, desired, now)
    match walk.run(router, stats, commands):
        case Promote():
            assert out.release is not None
            out.release = replace(out.release, step=None, step_started_at=None)
            return _switch(out, walk.canary, walk.stable, now, rollback=False)
        case Abort(reason):
            return _abort(out, walk.canary, walk.stable, reason, desired, now)
        case Continue():
            return out


def _watch(out: StepResult, stable: VersionRecord, desired: Desired, observed: dict[str, ObservedApp],
           stats: dict[str, canary_walk.Figures] | None, commands: list[Command], now: float) -> StepResult:
    match post_promotion.Watch(out, stable, desired, now).run(observed.get(stable.release), stats, commands):
        case Promote():
            return _healthy(out, stable.version, observed, now)
        case Abort(reason):
            return post_promotion.unpromote(out, stable, reason, desired, now)
        case Continue():
            return out


def _abort(out: StepResult, canary: VersionRecord, stable: VersionRecord, reason: str, desired: Desired, now: float) -> StepResult:
    """All traffic back to stable at once; the canary retires; git still asks for it, so say so."""
    assert out.release is not None
    out.versions = [canary_walk.retire(v, now) if v.version == canary.version
                    else replace(v, weight=100) if v.version == stable.version else v for v in out.versions]
    message = (f"canary {canary.version} rolled back: {reason}; {stable.version} serves 100%; "
               f"git still asks for {canary.version}: revert the commit "
               f"(it is held until a new commit or `diffops retry {canary.release}`)")
    out.release = replace(out.release, failed_version=canary.version, held_fingerprint=desired.fingerprint, step=None, step_started_at=None)
    out.release = with_phase(out.release, "Degraded", message, now)
    out.events.append(Event(canary.release, "aborted", message, canary.version, desired.commit))
    return out


def _preparing(out: StepResult, canary: VersionRecord, result: Prepared | None, desired: Desired, now: float,
               free: Resources | None = None) -> StepResult:
    assert out.release is not None
    stable = next(iter(role_of(out.versions, "stable")), None)
    if canary.status == "verified":
        return _start_when_it_fits(out, canary, stable, desired, free, now)
    if result is None:
        lacking = shortfall(per_replica(canary.spec), 1, free)
        if lacking:
            message = f"{canary.version}: waiting for capacity to run its checks: {lacking}"
            out.release = with_phase(out.release, "Progressing", message, now)
            if desired.release.spec.rollout.strategy == "auto" and stable is not None:
                Surge(out, canary, stable, now).make_room(f"its checks {lacking}")
            return out
        out.prepare.append(canary)
        out.release = with_phase(out.release, "Progressing", f"{canary.version}: verifying the model and running checks", now)
        return out
    if not result.ok:
        return _fail(out, canary, result.message, desired, now)
    verified = replace(canary, status="verified", gate_key=desired.gate_key)
    out.versions = [verified if v is canary else v for v in out.versions]
    out.events.append(Event(canary.release, "prepared", f"model verified, {result.message} ({result.seconds:.1f}s); "
                            f"next: start {canary.spec.replicas.count} replica(s) of {canary.version} at weight 0", canary.version))
    return _start_when_it_fits(out, verified, stable, desired, free, now)


def _start_when_it_fits(out: StepResult, canary: VersionRecord, stable: VersionRecord | None, desired: Desired,
                        free: Resources | None, now: float) -> StepResult:
    """Create the version's app only when every replica can be scheduled: never a silently pending replica."""
    assert out.release is not None
    count = canary.spec.replicas.count
    lacking = shortfall(per_replica(canary.spec), count, free)
    if lacking and desired.release.spec.rollout.strategy == "auto" and stable is not None:
        Surge(out, canary, stable, now).start(free)
        return out
    if lacking:
        message = (f"{canary.version}: waiting for capacity: {count} replica(s) beside the serving version {lacking}; "
                   "free GPUs or lower replicas.count")
        out.release = with_phase(out.release, "Progressing", message, now)
        return out
    started = replace(canary, status="starting", created_at=now)
    out.versions = [started if v is canary else v for v in out.versions]
    out.release = with_phase(out.release, "Progressing", f"{canary.version}: starting {count} replica(s)", now)
    return out


def _starting(out: StepResult, canary: VersionRecord, stable: VersionRecord | None, app: ObservedApp | None, desired: Desired,
              now: float) -> StepResult:
    assert out.release is not None
    if app is not None and app.ready:
        if desired.release.spec.rollout.strategy == "canary" and stable is not None:
            ready = replace(canary, status="ready", ready_at=now)
            out.versions = [ready if v is canary else v for v in out.versions]
            out.release = replace(out.release, load_seconds=now - canary.created_at)
            out.events.append(Event(canary.release, "ready", f"{canary.version} ready after {now - canary.created_at:.1f}s; "
                                    "next: walk the canary steps", canary.version))
            return out
        return _switch(out, canary, stable, now, rollback=False)
    if app is not None and app.failed:
        return _fail(out, canary, f"replicas failed to start: {app.message or app.status}", desired, now)
    elapsed, limit = now - canary.created_at, deadline_s(desired.release, out.release.load_seconds)
    if elapsed > limit:
        return _fail(out, canary, f"not ready after {elapsed:.0f}s (progress deadline {limit:.0f}s)", desired, now)
    running = f"{app.running}/{app.target or canary.spec.replicas.count}" if app else "0"
    message = f"{canary.version}: {running} replicas running after {elapsed:.0f}s (deadline {limit:.0f}s)"
    out.release = with_phase(out.release, "Progressing", message, now)
    return out


def _switch(out: StepResult, target: VersionRecord, stable: VersionRecord | None, now: float, rollback: bool) -> StepResult:
    assert out.release is not None
    promoted = replace(target, role="stable", weight=100, status="ready", standby_since=None, ready_at=target.ready_at if rollback else now)
    updated = []
    for version in out.versions:
        if version.version == target.version:
            updated.append(promoted)
        elif stable is not None and version.version == stable.version:
            updated.append(replace(version, role="standby", weight=0, standby_since=now))
        elif version.role == "standby":  # one warm standby at most: the previous stable
            out.events.append(Event(version.release, "standby-removed",
                                    f"standby {version.version} replaced by {stable.version if stable else 'none'}", version.version))
        else:
            updated.append(version)
    out.versions = updated
    delay = format_duration(out.release.spec.rollout.scale_down_delay) if out.release.spec else "?"
    after = f"; {stable.version} kept warm as standby for {delay}" if stable else ""
    if rollback:
        message = f"{target.version} was the warm standby: traffic switched back to it at once, no reload{after}"
        out.events.append(Event(target.release, "rolled-back", message, target.version))
    else:
        took = now - target.created_at
        out.release = replace(out.release, load_seconds=took)
        message = f"{target.version} ready after {took:.1f}s; traffic switched to it (100%){after}"
        out.events.append(Event(target.release, "promoted", message, target.version))
    out.release = replace(out.release, failed_version=None, held_fingerprint=None)
    watch = out.release.spec.rollout.post_promotion if out.release.spec else None
    if watch is not None and stable is not None and not rollback:
        out.release = post_promotion.begin(out.release, target.version, stable.version, watch.duration.total_seconds())
    out.release = with_phase(out.release, "Progressing", f"{target.version}: switching traffic to it (100%)", now)
    return out


def _recheck(out: StepResult, stable: VersionRecord, result: Prepared | None, desired: Desired, now: float) -> StepResult:
    """The checks changed (config or golden reference) under a serving version: gate it again, in place."""
    assert out.release is not None
    held = out.release.failed_version == stable.version and out.release.held_fingerprint == desired.fingerprint
    if held:
        return out
    if result is None:
        out.prepare.append(stable)
        out.release = with_phase(out.release, "Progressing", f"{stable.version}: checks changed; re-checking the serving version", now)
        return out
    if not result.ok:
        message = (f"{stable.version} failed its changed checks: {result.message}; it keeps serving; "
                   "fix the checks or the reference and commit")
        out.release = replace(out.release, failed_version=stable.version, held_fingerprint=desired.fingerprint)
        out.release = with_phase(out.release, "Degraded", message, now)
        out.events.append(Event(stable.release, "failed", message, stable.version, desired.commit))
        return out
    out.versions = [replace(v, gate_key=desired.gate_key) if v is stable else v for v in out.versions]
    out.release = replace(out.release, failed_version=None, held_fingerprint=None)
    out.events.append(Event(stable.release, "rechecked", f"{stable.version} passed its changed checks: {result.message}", stable.version))
    out.release = with_phase(out.release, "Progressing", f"{stable.version}: checks passed again", now)
    return out


def _fail(out: StepResult, canary: VersionRecord, reason: str, desired: Desired, now: float) -> StepResult:
    assert out.release is not None
    out.versions = [v for v in out.versions if v.version != canary.version]
    stable = next(iter(role_of(out.versions, "stable")), None)
    tail = f"{stable.version} keeps serving" if stable else "nothing is serving"
    message = f"{canary.version} failed: {reason}; {tail}; fix the release or its checks and commit"
    out.release = replace(out.release, failed_version=canary.version, held_fingerprint=desired.fingerprint)
    out.release = with_phase(out.release, "Degraded" if stable else "Failed", message, now)
    out.events.append(Event(canary.release, "failed", message, canary.version, desired.commit))
    return out


def _healthy(out: StepResult, version: str, observed: dict[str, ObservedApp], now: float) -> StepResult:
    """Healthy once the router itself answers with the recorded weights."""
    assert out.release is not None
    router = observed.get(out.release.name)
    app = observed.get(app_name(out.release.name, version))
    short = app is not None and not app.ready and bool(app.target)
    replicas = f" ({app.running}/{app.target} replicas running; Ray Serve is starting or replacing replicas)" if short and app else ""
    if router is None or router.weights != router_weights(out.versions):
        live = router.weights if router is not None else None
        message = f"{version}: switching traffic to it (100%){replicas}; router reports {live if live is not None else 'nothing yet'}"
        out.release = with_phase(out.release, "Progressing", message, now)
        return out
    message = f"{version} serving 100%"
    phase: Phase = "Healthy"
    was_short = out.release.phase in ("Healthy", "Failed") and out.release.message != message and out.release.message.startswith(message)
    if short and app is not None:
        message += replicas
        same_loss = out.release.message.startswith(message)
        if app.running == 0 and same_loss and (out.release.phase == "Failed" or now - out.release.updated_at >= NO_REPLICA_FAIL_S):
            # no replica for a while (its node died, say), not a quick replacement: nothing serves; nothing is rolled back
            phase, message = "Failed", message + f"; none for over {NO_REPLICA_FAIL_S:.0f}s: requests get 503 until one is back"
        if out.release.phase == "Healthy" and not was_short:
            out.events.append(Event(out.release.name, "replicas-lost", f"{version}: {app.running}/{app.target} replicas running; "
                                    "Ray Serve is replacing the lost ones; next: traffic stays on it, nothing is rolled back", version))
    elif was_short and app is not None:
        out.events.append(Event(out.release.name, "replicas-restored", f"{version}: all {app.running} replicas running again, "
                                f"{now - out.release.updated_at:.1f}s after the last loss was reported; next: nothing", version))
    out.release = with_phase(out.release, phase, message, now)
    return out


def _follow_light_changes(out: StepResult, stable: VersionRecord, spec: Spec) -> None:
    """In-place fields (count, queues, batch, cost) follow git; the model location stays what replicas loaded."""
    followed = spec.model_copy(update={"model": stable.spec.model})
    if followed != stable.spec:
        out.versions = [replace(v, spec=followed) if v is stable else v for v in out.versions]
        out.events.append(Event(stable.release, "updated", f"light change applied in place to {stable.version}; no replica restarts",
                                stable.version))


def _expire_standbys(out: StepResult, delay_s: float, now: float, keep: str | None = None) -> None:
    for version in [v for v in out.versions if v.status == "retiring" and v.retire_at is not None and now >= v.retire_at]:
        out.versions.remove(version)
        out.events.append(Event(version.release, "retired", f"rolled-back canary {version.version} deleted", version.version))
    for version in role_of(out.versions, "standby"):
        if version.standby_since is not None and now - version.standby_since >= delay_s and version.version != keep:
            out.versions.remove(version)
            out.events.append(Event(version.release, "standby-removed", f"standby {version.version} scaled down after {delay_s:.0f}s",
                                    version.version))


def _abandon_other_canaries(out: StepResult, target: str) -> None:
    for version in role_of(out.versions, "canary"):
        if version.version != target and version.status != "retiring":
            out.versions.remove(version)
            out.events.append(Event(version.release, "abandoned",
                                    f"{version.version} is no longer desired; its rollout stops and its app is deleted", version.version))
