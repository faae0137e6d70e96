"""Rendering the whole Serve config from recorded state: what may and may not restart replicas."""

from __future__ import annotations

from dataclasses import replace

from controller.records import ReleaseRecord, VersionRecord
from controller.serve_config import RenderSettings, render
from controller.versions import version_id
from tests.conftest import make_release

SETTINGS = RenderSettings(repo="/repo", cache_dir="/state/models", http_port=8000)


def records(release, role="stable", weight=100, status="ready"):
    spec = release.model_dump(mode="json")["spec"]
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
    spec = scaled.model_dump(mode="json")["spec"]
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
    from controller.serve_client import brief

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
