"""Rendering the whole Serve config from recorded state: what may and may not restart replicas."""

from __future__ import annotations

import json
from dataclasses import replace

from controller.apply.serve_config import RenderSettings, render
from controller.parse.release import Spec
from controller.plan.versions import version_id
from controller.state.records import ReleaseRecord, VersionRecord
from tests.conftest import make_release, respec

SETTINGS = RenderSettings(repo="/repo", cache_dir="/state/models", http_port=8000)


def records(release, role="stable", weight=100, status="ready"):
    spec = release.spec
    version = VersionRecord(release.name, version_id(release), role, weight, status, "c1", spec, 1.0)
    return ReleaseRecord(release.name, "Healthy", "", "c1", version.version, spec, 1.0), version


def apps(config):
    return {app["name"]: app for app in config["applications"]}


def test_one_router_and_one_app_per_live_version():
    release, stable = records(make_release())
    _, canary = records(make_release(("    steps: 4\n", "    steps: 8\n")), role="canary", weight=0, status="starting")
    _, preparing = records(make_release(("    steps: 4\n", "    steps: 9\n")), role="canary", weight=0, status="preparing")
    config = render([release], [stable, canary], SETTINGS)
    assert set(apps(config)) == {"demo", f"demo--{stable.version}", f"demo--{canary.version}"}
    router = apps(config)["demo"]
    assert router["route_prefix"] == "/demo"
    assert router["deployments"][0]["user_config"]["weights"] == {stable.version: 100, canary.version: 0}
    assert apps(config)[f"demo--{stable.version}"]["route_prefix"] is None
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert render([release], [stable, preparing], SETTINGS) == render([release], [stable], SETTINGS)  # not before its model is verified


def test_light_changes_touch_only_lightweight_options():
    release, stable = records(make_release())
    scaled = make_release(("    count: 1\n", "    count: 3\n"), ("    max_batch_size: 4\n", "    max_batch_size: 2\n"),
                          ("    max_queued_requests: 16\n", "    max_queued_requests: 64\n"), ("    max_images: 4\n", "    max_images: 2\n"))
    spec = scaled.spec
    before = apps(render([release], [stable], SETTINGS))
    after = apps(render([replace(release, spec=spec)], [replace(stable, spec=spec)], SETTINGS))
    model_before, model_after = before[f"demo--{stable.version}"], after[f"demo--{stable.version}"]
    assert model_before["args"] == model_after["args"]
    assert model_before["deployments"][0]["ray_actor_options"] == model_after["deployments"][0]["ray_actor_options"]
    assert model_after["deployments"][0]["num_replicas"] == 3
    assert model_after["deployments"][0]["user_config"]["max_batch_size"] == 2
    assert after["demo"]["deployments"][0]["user_config"]["limits"]["max_images"] == 2
    assert before["demo"]["args"] == after["demo"]["args"]


def test_resources_and_args_come_from_the_version():
    release, stable = records(make_release(("    gpus: 0\n", "    gpus: 1\n"), ("    cpus: 0.5\n", "    cpus: 2\n")))
    model = apps(render([release], [stable], SETTINGS))[f"demo--{stable.version}"]
    assert model["deployments"][0]["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert model["args"]["commit"] == "c1" and model["args"]["cache_dir"] == "/state/models"
    adopted = replace(stable, deployed_args={"release": "demo", "kept": True})
    assert apps(render([release], [adopted], SETTINGS))[f"demo--{stable.version}"]["args"] == {"release": "demo", "kept": True}


def test_render_is_deterministic():
    release_a, stable_a = records(make_release(name="alpha"))
    release_b, stable_b = records(make_release(name="beta"))
    assert render([release_b, release_a], [stable_b, stable_a], SETTINGS) == render([release_a, release_b], [stable_a, stable_b], SETTINGS)


def test_a_ray_traceback_becomes_one_line_naming_the_exception():
    from controller.apply.serve_client import brief

    ray_message = (
        "Failed to update the deployments ['Model']. The deployment failed to start 3 times in a row. This may be due to "
        "a problem with its constructor or initial health check failing. See controller logs for details. Error:\n"
        "\x1b[36mray::ServeReplica:demo--fbc25fc6de:Model.initialize_and_get_metadata()\x1b[39m (pid=8051)\n"
        "RuntimeError: Traceback (most recent call last):\n  File \"/x/replica.py\", line 1867, in initialize\n"
        "    await self._user_callable_wrapper.initialize_callable()\n"
        "serving.model_server.InjectedFault: demo--fbc25fc6de: injected startup failure (spec.faults.startup_error)\n"
    )
    assert brief(ray_message) == (
        "Failed to update the deployments ['Model']. The deployment failed to start 3 times in a row. This may be due to "
        "a problem with its constructor or initial health check failing. See controller logs for details. "
        "Error: serving.model_server.InjectedFault: demo--fbc25fc6de: injected startup failure (spec.faults.startup_error)"
    )
    assert brief("Deploying app 'demo'.\n  Waiting for replicas.") == "Deploying app 'demo'. Waiting for replicas."


def test_every_app_carries_the_owner_mark_in_a_lightweight_option():
    from controller.apply.serve_config import default_controller_id

    release, stable = records(make_release())
    config = render([release], [stable], replace(SETTINGS, owner="ctl-7"))
    for app in config["applications"]:
        assert [d["user_config"]["owner"] for d in app["deployments"]] == ["ctl-7"]
    unmarked = render([release], [stable], replace(SETTINGS, owner="ctl-8"))
    assert [a["args"] for a in unmarked["applications"]] == [a["args"] for a in config["applications"]]  # args: no restart
    assert default_controller_id("/var/lib/a") == default_controller_id("/var/lib/a/../a")  # stable for one dir
    assert default_controller_id("/var/lib/a") != default_controller_id("/var/lib/b")


def test_the_whole_document_ray_serve_receives_for_the_demo_release():
    """Written out by hand from releases/demo.yaml and the README (graceful shutdown 60 s, the proxy on the head only,
    on loopback): any renamed key or changed option is a different Serve config. Every key is one Ray's config schema
    reads (`tests/test_deploy.py` checks that against `ServeDeploySchema`)."""
    release, stable = records(make_release())
    generation = release.spec.generation.model_dump(mode="json")
    app = f"demo--{stable.version}"
    assert render([release], [stable], replace(SETTINGS, owner="ctl-1", http_port=8123)) == {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "applications": [
            {"name": "demo", "route_prefix": "/demo", "import_path": "serving.router:build_router_app", "args": {"release": "demo"},
             "deployments": [{
                 "name": "Router", "num_replicas": 1, "max_ongoing_requests": 1024, "ray_actor_options": {"num_cpus": 0.05},
                 "graceful_shutdown_timeout_s": 60, "graceful_shutdown_wait_loop_s": 1,
                 "user_config": {"weights": {stable.version: 100},
                                 "limits": {"max_steps": 50, "max_pixels": 262144, "max_images": 4, "max_prompt_chars": 2000},
                                 "defaults": {"width": 64, "height": 64}, "retry_after_s": 1, "owner": "ctl-1"}}]},
            {"name": app, "route_prefix": None, "import_path": "serving.model_server:build_model_app",
             "args": {"release": "demo", "version": stable.version,
                      "model": {"uri": "file://models/tiny-sd", "digest": "sha256:2b30c6ef7b43b8a62eb17faac4ed5a57d221d7b7d29409f0587ecf2af91b4199",
                                "dtype": "float32"},
                      "generation": generation, "repo": "/repo", "commit": "c1", "cache_dir": "/state/models", "gpus": 0, "faults": None},
             "deployments": [{
                 "name": "Model", "num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 16,
                 "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
                 "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "owner": "ctl-1"},
                 "graceful_shutdown_timeout_s": 60, "graceful_shutdown_wait_loop_s": 1,
                 "health_check_period_s": 10, "health_check_timeout_s": 60}]},
        ],
    }
    assert generation["steps"] == 4 and generation["sampler"] == "ddim"


# (case, version status, weight, surge replicas) -> rendered? and with how many replicas
RENDERED = [
    ("preparing: no app yet", "preparing", 0, None, None),
    ("verified: no app yet", "verified", 0, None, None),
    ("starting", "starting", 0, None, 1),
    ("ready", "ready", 100, None, 1),
    ("retiring (an aborted canary, until in-flight requests finish)", "retiring", 0, None, 1),
    ("a surge holds its own replica count", "starting", 0, 2, 2),
    ("a surge down to zero replicas", "ready", 0, 0, 0),
]


def test_which_versions_have_an_app_and_with_how_many_replicas():
    release, stable = records(make_release())
    _, canary = records(make_release(("    steps: 4\n", "    steps: 8\n")), role="canary")
    for case, status, weight, replicas, expected in RENDERED:
        version = replace(canary, status=status, weight=weight, replicas=replicas)
        config = apps(render([release], [stable, version], SETTINGS))
        if expected is None:
            assert set(config) == {"demo", stable.app}, case
            assert config["demo"]["deployments"][0]["user_config"]["weights"] == {stable.version: 100}, case
        else:
            assert config[version.app]["deployments"][0]["num_replicas"] == expected, case
            assert config["demo"]["deployments"][0]["user_config"]["weights"] == {stable.version: 100, version.version: weight}, case


def test_a_release_with_nothing_live_has_no_router():
    release, stable = records(make_release())
    other, _ = records(make_release(name="other"))
    assert [a["name"] for a in render([release, other], [stable], SETTINGS)["applications"]] == ["demo", stable.app]
    limited = replace(stable, spec=respec(stable.spec, limits={"max_images": 2}))
    router = apps(render([replace(release, spec=None)], [limited], SETTINGS))["demo"]  # no valid spec recorded: the version's
    assert router["deployments"][0]["user_config"]["limits"]["max_images"] == 2


def test_an_older_record_without_batch_wait_or_cost_gets_the_defaults():
    release, stable = records(make_release())
    older = stable.spec.model_dump(mode="json")  # as a diffops before those fields recorded it
    del older["replicas"]["batch_wait_timeout_s"], older["cost"]
    spec = Spec.model_validate_json(json.dumps(older))  # how the state store reads a recorded spec
    model = apps(render([release], [replace(stable, spec=spec)], SETTINGS))[stable.app]
    assert model["deployments"][0]["user_config"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "owner": "diffops"}


def test_on_a_container_runtime_each_version_runs_in_its_release_image():
    """`--container-runtime podman`: a version app's runtime_env names its release's `runtime.image` (Ray starts its replicas
    in it), beside the serving-code pin; the router carries no image; Ray's own runtime_env and Serve schemas accept it."""
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    release, stable = records(make_release())
    image = stable.spec.runtime.image
    config = apps(render([release], [stable], replace(SETTINGS, container_runtime="podman", serving_code="diffops 1 serving ab")))
    assert config[stable.app]["runtime_env"] == {"image_uri": image, "env_vars": {"DIFFOPS_SERVING_CODE": "diffops 1 serving ab"}}
    assert config["demo"]["runtime_env"] == {"env_vars": {"DIFFOPS_SERVING_CODE": "diffops 1 serving ab"}}
    RuntimeEnv(**config[stable.app]["runtime_env"])  # Ray refuses image_uri beside anything but env_vars and config
    ServeDeploySchema.model_validate(render([release], [stable], replace(SETTINGS, container_runtime="podman")))
    plain = apps(render([release], [stable], replace(SETTINGS, serving_code="diffops 1 serving ab")))
    assert "image_uri" not in plain[stable.app]["runtime_env"]  # the default: nodes run their own environment


def test_serving_metrics_off_is_a_lightweight_switch_in_every_deployment():
    """`--serving-metrics off`: every router and replica is told in its user_config (reconfigured in place, no restart);
    nothing else of the apps changes."""
    release, stable = records(make_release())
    on, off = render([release], [stable], SETTINGS), render([release], [stable], replace(SETTINGS, serving_metrics=False))
    assert all("metrics" not in d["user_config"] for app in on["applications"] for d in app["deployments"])
    assert [d["user_config"]["metrics"] for app in off["applications"] for d in app["deployments"]] == [False, False]
    strip = lambda config: [{**a, "deployments": [{**d, "user_config": None} for d in a["deployments"]]}  # noqa: E731
                            for a in config["applications"]]
    assert strip(on) == strip(off)
