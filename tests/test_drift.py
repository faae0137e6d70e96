"""Drift and ownership decisions, as tables: what is ours, what differs, what is carried, which names are taken."""

from __future__ import annotations

import copy

import pytest

from controller.apply.drift import Drift, carried, differences, essence, find_drift, holder, mark, owner_of, partition
from controller.state.records import ObservedApp

ROUTER = {
    "name": "demo", "route_prefix": "/demo", "import_path": "serving.router:build_router_app", "args": {"release": "demo"},
    "deployments": [{"name": "Router", "num_replicas": 1, "max_ongoing_requests": 1024, "ray_actor_options": {"num_cpus": 0.05},
                     "user_config": {"weights": {"v1": 100}, "limits": {"max_images": 4}, "owner": "me"}}],
}
MODEL = {
    "name": "demo--v1", "route_prefix": None, "import_path": "serving.model_server:build_model_app",
    "args": {"release": "demo", "version": "v1", "commit": "c1"},
    "deployments": [{"name": "Model", "num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 16,
                     "ray_actor_options": {"num_cpus": 2, "num_gpus": 0}, "graceful_shutdown_timeout_s": 60,
                     "user_config": {"max_batch_size": 4, "owner": "me"}}],
}


def seen(config: dict | None, status: str = "RUNNING", name: str | None = None) -> ObservedApp:
    return ObservedApp(name or config["name"], status, config=config)


def edited(app: dict, **deployment: object) -> dict:
    out = copy.deepcopy(app)
    out["deployments"][0].update(deployment)
    return out


# What Ray reports back differs in form only: floats for ints, unset options absent, None routes dropped.
AS_RAY_REPORTS = {**copy.deepcopy(MODEL), "deployments": [{**copy.deepcopy(MODEL["deployments"][0]),
                                                            "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.0}}]}
del AS_RAY_REPORTS["route_prefix"]


@pytest.mark.parametrize("applied, reported, expected", [
    (MODEL, {"demo--v1": seen(MODEL)}, []),
    (MODEL, {"demo--v1": seen(AS_RAY_REPORTS)}, []),
    (MODEL, {}, [Drift("demo--v1", "missing from Ray Serve")]),
    (MODEL, {"demo--v1": seen(MODEL, "DELETING")}, [Drift("demo--v1", "being deleted by Ray Serve")]),
    (MODEL, {"demo--v1": seen(None, name="demo--v1")}, [Drift("demo--v1", "Ray Serve reports no deployed config for it")]),
    (MODEL, {"demo--v1": seen(edited(MODEL, num_replicas=0))},
     [Drift("demo--v1", "changed: deployments.Model.num_replicas: 1.0 -> 0.0")]),
    (MODEL, {"demo--v1": seen({**MODEL, "args": {**MODEL["args"], "commit": "c2"}})},
     [Drift("demo--v1", "changed: args.commit: 'c1' -> 'c2'")]),
    (MODEL, {"demo--v1": seen(edited(MODEL, ray_actor_options={"num_cpus": 2, "num_gpus": 1}))},
     [Drift("demo--v1", "changed: deployments.Model.ray_actor_options.num_gpus: 0.0 -> 1.0")]),
    (ROUTER, {"demo": seen(edited(ROUTER, user_config={**ROUTER["deployments"][0]["user_config"], "weights": {"v1": 0}}))},
     [Drift("demo", "changed: deployments.Router.user_config.weights.v1: 100.0 -> 0.0")]),
    (ROUTER, {"demo": seen({**ROUTER, "route_prefix": "/elsewhere"})},
     [Drift("demo", "changed: route_prefix: '/demo' -> '/elsewhere'")]),
    (ROUTER, {"demo": seen({**ROUTER, "import_path": "x:y"})},
     [Drift("demo", "changed: import_path: 'serving.router:build_router_app' -> 'x:y'")]),
    (MODEL, {"demo--v1": seen(edited(MODEL, graceful_shutdown_timeout_s=5, health_check_period_s=1))}, []),  # not what serves
])
def test_drift_table(applied, reported, expected):
    assert find_drift([applied], reported) == expected


def test_every_difference_is_named_with_both_values():
    assert differences(essence(MODEL), essence(edited(MODEL, num_replicas=3, max_queued_requests=1))) == [
        "deployments.Model.max_queued_requests: 16.0 -> 1.0", "deployments.Model.num_replicas: 1.0 -> 3.0"]
    assert Drift("demo--v1", "x").release == "demo" and Drift("demo", "x").release == "demo"


FOREIGN = {**copy.deepcopy(ROUTER), "name": "shop", "deployments": [{"name": "Router", "user_config": {"owner": "them"}}]}
UNMARKED = {"name": "legacy", "import_path": "app:build", "deployments": [{"name": "D", "user_config": {"x": 1}}]}


@pytest.mark.parametrize("observed, recorded, ours, others", [
    ({"demo": seen(ROUTER)}, set(), {"demo"}, set()),
    ({"shop": seen(FOREIGN)}, set(), set(), {"shop"}),
    ({"shop": seen(FOREIGN)}, {"shop"}, set(), {"shop"}),  # another owner's mark wins over our records
    ({"legacy": seen(UNMARKED)}, set(), set(), {"legacy"}),  # unmarked: someone else's
    ({"legacy": seen(UNMARKED)}, {"legacy"}, {"legacy"}, set()),  # unmarked but recorded by us: ours from before marks
    ({"imperative": seen(None, name="imperative")}, set(), set(), {"imperative"}),
    ({"demo--old": seen(None, "DELETING", name="demo--old")}, {"demo--old"}, {"demo--old"}, set()),  # ours, config gone
])
def test_partition_table(observed, recorded, ours, others):
    mine, theirs = partition(observed, "me", recorded)
    assert (set(mine), set(theirs)) == (ours, others)


@pytest.mark.parametrize("release, others, refused_because", [
    ("demo", {}, None),
    ("demo", {"shop": seen(FOREIGN)}, None),
    ("demo", {"demo": seen({**FOREIGN, "name": "demo"})}, "belongs to controller 'them'"),
    ("demo", {"demo--abc": seen({**UNMARKED, "name": "demo--abc"})}, "belongs to another Ray Serve client (no diffops owner mark)"),
    ("demo", {"demonstration": seen({**FOREIGN, "name": "demonstration"})}, None),
    ("demo", {"demo--abc": seen(None, "DELETING", name="demo--abc")}, None),  # going away (Ray drops its config): no holder
])
def test_a_name_held_by_another_owner_is_refused(release, others, refused_because):
    refusal = holder(release, others)
    if refused_because is None:
        assert refusal is None
    else:
        assert refused_because in refusal and "left untouched" in refusal and "next:" in refusal


def test_others_are_carried_exactly_as_reported_unless_being_deleted():
    others = {"shop": seen(FOREIGN), "gone": seen({**FOREIGN, "name": "gone"}, "DELETING"), "imperative": seen(None, name="imperative")}
    assert carried(others) == [FOREIGN]


def test_the_owner_mark_is_on_every_deployment_and_keeps_the_rest():
    app = {"name": "a", "deployments": [{"name": "A", "user_config": {"k": 1}}, {"name": "B"}]}
    marked = mark(app, "ctl-1")
    assert [d["user_config"] for d in marked["deployments"]] == [{"k": 1, "owner": "ctl-1"}, {"owner": "ctl-1"}]
    assert owner_of(marked) == "ctl-1" and owner_of(app) is None and owner_of(None) is None
    assert app["deployments"][1] == {"name": "B"}  # the input is not changed


LONG_ARG = "x" * 100
# (case, applied, reported, what the drift says): the wording of a drift, exactly
WORDING = [
    ("a field Ray no longer reports is absent", MODEL, {**MODEL, "args": {"release": "demo", "version": "v1"}},
     "changed: args.commit: 'c1' -> absent"),
    ("a long value is cut at 80 characters", MODEL, {**MODEL, "args": {**MODEL["args"], "commit": LONG_ARG}},
     f"changed: args.commit: 'c1' -> '{LONG_ARG[:78]}…"),
    ("six differences: five named, the rest counted", MODEL,
     edited(MODEL, num_replicas=2, max_ongoing_requests=8, max_queued_requests=1, ray_actor_options={"num_cpus": 1, "num_gpus": 1},
            user_config={"max_batch_size": 1, "owner": "me"}),
     "changed: deployments.Model.max_ongoing_requests: 4.0 -> 8.0; deployments.Model.max_queued_requests: 16.0 -> 1.0; "
     "deployments.Model.num_replicas: 1.0 -> 2.0; deployments.Model.ray_actor_options.num_cpus: 2.0 -> 1.0; "
     "deployments.Model.ray_actor_options.num_gpus: 0.0 -> 1.0; and 1 more"),
    ("booleans stay booleans", {**MODEL, "args": {**MODEL["args"], "flag": True}}, {**MODEL, "args": {**MODEL["args"], "flag": "yes"}},
     "changed: args.flag: True -> 'yes'"),
]


@pytest.mark.parametrize("case", WORDING, ids=[c[0] for c in WORDING])
def test_drift_wording(case):
    _, applied, reported, says = case
    assert find_drift([applied], {applied["name"]: seen(reported)}) == [Drift(applied["name"], says)]


@pytest.mark.parametrize("app, release", [("demo", "demo"), ("demo--v1", "demo"), ("demo--v1--x", "demo"), ("a-b--v2", "a-b")])
def test_the_release_of_an_application(app, release):
    assert Drift(app, "x").release == release


def test_a_name_is_refused_even_when_another_owners_app_sorts_before_it():
    others = {"alpha": seen({**FOREIGN, "name": "alpha"}), "demo--abc": seen({**FOREIGN, "name": "demo--abc"})}
    assert "'demo--abc' belongs to controller 'them'" in holder("demo", others)


@pytest.mark.parametrize("length, shown", [(78, "'" + "y" * 78 + "'"), (79, "'" + "y" * 78 + "…")])  # repr adds 2 quotes: 80 is kept
def test_a_value_of_exactly_80_characters_is_shown_whole(length, shown):
    value = "y" * length
    [drift] = find_drift([MODEL], {"demo--v1": seen({**MODEL, "args": {**MODEL["args"], "commit": value}})})
    assert drift.what == f"changed: args.commit: 'c1' -> {shown}"


def test_five_differences_are_all_named():
    changed = edited(MODEL, num_replicas=2, max_ongoing_requests=8, max_queued_requests=1, ray_actor_options={"num_cpus": 1, "num_gpus": 1})
    [drift] = find_drift([MODEL], {"demo--v1": seen(changed)})
    assert drift.what.count(" -> ") == 5 and "more" not in drift.what
