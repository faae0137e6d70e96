"""User feedback end to end on real Ray: images generated through the Serve proxy are rated by their X-Request-Id,
and the ratings and flags reach the controller's state file (`diffops quality`) and its metrics endpoint."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.live import DIFFOPS, SERVE_URL, generate, running_controller, stable_version, wait_for

pytestmark = pytest.mark.timeout(400)


def post(body: dict[str, Any], client: str = "alice") -> httpx.Response:
    return httpx.post(f"{SERVE_URL}/demo/feedback", json=body, headers={"X-Diffops-Client": client}, timeout=30)


def quality(state_dir: Any) -> dict[str, Any]:
    result = subprocess.run([DIFFOPS, "quality", "demo", "--state-dir", str(state_dir), "-o", "json"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {v["version"]: v for v in json.loads(result.stdout)["versions"]}


def test_feedback_on_real_images_reaches_diffops_quality_and_the_controller_metrics(model_repo, warm_serve, tmp_path) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    with running_controller(model_repo.path, state_dir, "--metrics-port", str(port), warm=True) as (controller, release):
        version = stable_version(release)
        ids = []
        for seed in (1, 2, 3):
            image = generate(body={"prompt": "a red cube", "steps": 2, "seed": seed})
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), image.text[:300]
            ids.append(image.headers["X-Request-Id"])

        first = post({"request_id": ids[0], "rating": 5})
        assert first.status_code == 202 and first.json()["version"] == version == first.headers["X-Diffops-Version"]
        assert post({"request_id": ids[1], "rating": 2, "flags": ["artifact", "nsfw"], "comment": "smudged"}).status_code == 202
        wait_for(lambda: quality(state_dir).get(version, {}).get("feedback") == 2, 30, "two feedback stored")

        assert post({"request_id": ids[0], "rating": 3, "flags": ["prompt_mismatch"]}).status_code == 202  # replaces alice's 5
        assert post({"request_id": ids[0], "rating": 4}, client="bob").status_code == 202
        unknown = post({"request_id": "never-answered-0001", "rating": 4})
        assert unknown.status_code == 404 and unknown.json()["field"] == "request_id"
        assert unknown.headers["content-type"] == "application/problem+json"
        bad = post({"request_id": ids[2], "rating": 7, "flags": ["nsfw"]})
        assert bad.status_code == 422 and bad.json()["field"] == "rating"

        shown = wait_for(lambda: (q := quality(state_dir).get(version)) and q["feedback"] == 3 and q, 30, "the repeat stored")
        assert shown["ratings"] == {"count": 3, "mean": 3.0, "histogram": {"1": 0, "2": 1, "3": 1, "4": 1, "5": 0}}
        assert {flag: f["count"] for flag, f in shown["flags"].items()} == {"nsfw": 1, "artifact": 1, "prompt_mismatch": 1, "other": 0}
        assert shown["flags"]["nsfw"]["rate"] == pytest.approx(1 / 3, abs=1e-3) and shown["comments"] == 1

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for stars in ("2", "3", "4", "5"):  # every answer stored counts: alice's 5, then her 3 that replaced it
            assert f'diffops_feedback_total{{rating="{stars}",release="demo",version="{version}"}} 1.0' in metrics, metrics[-3000:]
        for flag in ("artifact", "nsfw", "prompt_mismatch"):
            assert f'diffops_flags_total{{flag="{flag}",release="demo",version="{version}"}} 1.0' in metrics
        assert "stored 2 feedback entries" in controller.logs
