"""A release on a registered model, on the real thing: `models:/tiny@production` rolls out through the controller and
serves; moving the alias is drift (status and log), never followed; a pin the registry does not have is refused.

Against the session's local Ray (tests/live.py) and the controller's own embedded MLflow store (its state dir).
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from controller.cli.main import main
from serving.manifest import MANIFEST_NAME, manifest_of
from tests.conftest import demo_repo
from tests.live import Controller, generate, healthy_on, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)


def diffops(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_registered_model_rolls_out_and_an_alias_move_is_reported_never_followed(serve, tmp_path):
    repo = demo_repo(tmp_path / "repo")
    state = tmp_path / "state"
    model = repo.path / "models" / "tiny-sd"
    first = diffops("model", "register", str(model), "--name", "tiny", "--state-dir", str(state)).split()
    assert first == ["models:/tiny/1", manifest_of(model).digest]
    diffops("model", "promote", "tiny", "1", "--alias", "production", "--state-dir", str(state))
    repo.release("demo", **{"uri: file://models/tiny-sd": "uri: models:/tiny@production"})
    repo.commit("demo: serve the registry's production model")

    controller = Controller(repo.path, state, "--registry-interval", "2").start()
    try:
        serving = stable_version(controller.wait_release(healthy_on(), timeout=300))
        answer = generate()
        assert answer.status_code == 200 and answer.headers["X-Diffops-Version"] == serving
        assert "models:/tiny@production resolved to models:/tiny/1 at file://" in controller.logs
        pid, gates = controller.process.pid, controller.logs.count("running the gate as a Ray job")

        variant = tmp_path / "tiny-variant"  # one config byte changed: another digest
        shutil.copytree(model, variant)
        (variant / MANIFEST_NAME).unlink(missing_ok=True)
        (variant / "model_index.json").write_text((variant / "model_index.json").read_text() + " ")
        second = diffops("model", "register", str(variant), "--name", "tiny", "--state-dir", str(state)).split()
        assert second[0] == "models:/tiny/2" and second[1] != first[1]
        diffops("model", "promote", "tiny", "2", "--alias", "production", "--state-dir", str(state))

        drifted = wait_for(lambda: controller.release().get("registry_drift"), 60, "registry drift in diffops status")
        assert drifted["uri"] == "models:/tiny@production"
        for word in ("models:/tiny/2", second[1], first[1], "serving is unchanged", "diffops model pin demo"):
            assert word in drifted["message"]
        wait_for(lambda: "demo: registry drift: models:/tiny@production now resolves to models:/tiny/2" in controller.logs,
                 30, "the drift's warning line")
        answer = generate()
        assert answer.status_code == 200 and answer.headers["X-Diffops-Version"] == serving  # the same version serves
        release = controller.release()
        assert release["phase"] == "Healthy" and [v["id"] for v in release["versions"]] == [serving]
        assert controller.logs.count("running the gate as a Ray job") == gates and controller.process.pid == pid
        assert controller.logs.count("registry drift: ") == 1  # said once while it lasts

        diffops("model", "promote", "tiny", "1", "--alias", "production", "--state-dir", str(state))
        wait_for(lambda: "demo: registry drift over: models:/tiny@production agrees with the release again" in controller.logs,
                 60, "the drift's end line")
        wait_for(lambda: controller.release().get("registry_drift") is None, 30, "no drift in diffops status")

        repo.release("demo", **{"uri: file://models/tiny-sd": "uri: models:/tiny/1", first[1]: second[1]})
        repo.commit("demo: pin the variant's digest on tiny/1 (a mistake)")
        refused = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=120)
        for word in ("models:/tiny/1", first[1], second[1], "diffops model pin demo", f"{serving} keeps serving"):
            assert word in refused["message"], refused["message"]
        answer = generate()
        assert answer.status_code == 200 and answer.headers["X-Diffops-Version"] == serving
    finally:
        if controller.process and controller.process.poll() is None:
            controller.stop()
