"""The quality loop on the real thing: a real Ray head and Serve, the tiny pipeline, the tiny CLIP model and the tiny
safety checkers (models/, made by scripts/make_tiny_quality_models.py), a controller process.

- A canary whose safety checker flags every image (action block: its answers are 451 with a reason) is rolled back
  by analysis on its NSFW rate, while every request the stable version answers succeeds.
- Outputs sampled for review and CLIP scoring reach the controller's state and the review page; a reviewer's
  rating there shows in `diffops status`; a canary that users rate 1 through the feedback API is rolled back on its
  mean rating, with the ratings on the canary in `diffops quality`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.manifest import manifest_of
from tests.conftest import ROOT, ReleaseRepo, free_port
from tests.live import DIFFOPS, SERVE_URL, Load, gate_runs, generate, running_controller, stable_version, wait_for
from tests.test_metrics_e2e import export_urls, scrape, total

pytestmark = pytest.mark.timeout(600)

QUALITY_MODELS = ("tiny-clip", "tiny-safety-none", "tiny-safety-all")
CANARY = """    strategy: canary
    steps:
      - weight: 50
      - pause: 10m
      - weight: 100
    analysis:
      interval: 2s
      min_requests: {min_requests}
      failure_limit: 1
{quality}
"""


def pin(repo: ReleaseRepo, name: str) -> str:
    return f"{{uri: file://models/{name}, digest: \"{manifest_of(repo.path / 'models' / name).digest}\"}}"


@pytest.fixture
def quality_repo(model_repo: ReleaseRepo) -> ReleaseRepo:
    """The demo repo with the tiny quality models committed beside the tiny pipeline."""
    for name in QUALITY_MODELS:
        shutil.copytree(ROOT / "models" / name, model_repo.path / "models" / name)
    model_repo.commit("tiny quality models")
    return model_repo


def release_with(repo: ReleaseRepo, quality: str, rollout: str | None = None, steps: int = 4) -> str:
    edits = {"  cost:\n": f"  quality:\n{quality}  cost:\n", "steps: 4": f"steps: {steps}"}
    if rollout is not None:
        edits["    strategy: bluegreen\n"] = rollout
    repo.release(**edits)
    return repo.commit("quality change")


def quality_report(state_dir: Path) -> dict[str, Any]:
    result = subprocess.run([DIFFOPS, "quality", "demo", "-o", "json", "--state-dir", str(state_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {v["version"]: v for v in json.loads(result.stdout)["versions"]}


def exported(temp_dir: str, name: str, least: float, **labels: str) -> float:
    """A ray_diffops_* series' total in Ray's metrics export, once it reaches `least`."""
    def reached() -> float | None:
        value = total(scrape(export_urls(temp_dir)), name, **labels)
        return value if value >= least else None

    return wait_for(reached, 90, f"{name} {labels} >= {least} in Ray's metrics export", every=2)


def test_a_canary_whose_checker_flags_every_image_is_blocked_and_rolled_back_on_its_nsfw_rate(quality_repo, serve, ray_head, tmp_path):
    release_with(quality_repo, f"    safety: {pin(quality_repo, 'tiny-safety-none')}\n")
    with running_controller(quality_repo.path, tmp_path / "state") as (controller, healthy):
        stable = stable_version(healthy)
        answer = generate()
        assert answer.status_code == 200 and "X-Diffops-Nsfw" not in answer.headers  # the checker that flags nothing
        rollout = CANARY.format(min_requests=3, quality="      max_nsfw_rate: 0.2")
        quality = f"    safety:\n      uri: file://models/tiny-safety-all\n      digest: \"{manifest_of(quality_repo.path / 'models/tiny-safety-all').digest}\"\n      action: block\n"
        with Load() as load:
            release_with(quality_repo, quality, rollout)
            canary_live = controller.wait_release(lambda r: any(v["role"] == "canary" and v["weight"] == 50 for v in r["versions"]),
                                                  timeout=240)
            rolled_back = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=90)
        canary = next(v["id"] for v in canary_live["versions"] if v["role"] == "canary")
        assert "NSFW rate 1.00 > 0.2" in rolled_back["message"] and f"canary {canary} rolled back" in rolled_back["message"]
        assert {v["id"]: v["weight"] for v in rolled_back["versions"]}[stable] == 100
        by_version: dict[str, list[int]] = {}
        for _, code, version, _ in load.answers:
            by_version.setdefault(version, []).append(code)
        assert by_version[stable] and set(by_version[stable]) == {200}, load.codes  # 0 failed requests on the stable version
        assert set(by_version[canary]) == {451}, load.codes  # every canary image withheld
        blocked = next(body for _, code, _, body in load.answers if code == 451)
        problem = json.loads(blocked)
        assert problem["type"] == "/problems/content-blocked" and "safety checker" in problem["detail"]
        controller.wait_release(lambda r: next(v for v in r["versions"] if v["id"] == stable)["live_weight"] == 100, timeout=60)
        assert generate().headers["X-Diffops-Version"] == stable  # once the router draws with the rolled-back weights
        assert exported(ray_head.temp_dir, "ray_diffops_nsfw_total", 1, release="demo", version=canary, action="block") >= 1


def test_sampled_outputs_reach_the_review_page_and_a_canary_users_rate_1_is_rolled_back(quality_repo, serve, ray_head, tmp_path):
    sampling = f"    review:\n      sample_rate: 1\n      max_samples: 4\n    clip:\n      uri: file://models/tiny-clip\n" \
               f"      digest: \"{manifest_of(quality_repo.path / 'models/tiny-clip').digest}\"\n      sample_rate: 1\n"
    release_with(quality_repo, sampling)
    review_port = free_port()
    with running_controller(quality_repo.path, tmp_path / "state", "--review-port", str(review_port), "--live-quality-interval", "2") \
            as (controller, healthy):
        stable = stable_version(healthy)
        for n in range(6):
            assert generate(body={"prompt": f"a red cube {n}", "steps": 2, "seed": n}).status_code == 200

        def sampled() -> dict[str, Any] | None:
            mine = quality_report(controller.state_dir).get(stable)
            return mine if mine and mine["samples"]["count"] >= 6 and mine["clip_score"]["count"] >= 6 else None

        mine = wait_for(sampled, 60, "six sampled outputs, scored, in the controller's state")
        assert mine["samples"]["kept_for_review"] == 4  # quality.review.max_samples per version
        assert 0 <= mine["clip_score"]["mean"] <= 100
        assert exported(ray_head.temp_dir, "ray_diffops_clip_score_count", 6, release="demo", version=stable) >= 6
        page = f"http://127.0.0.1:{review_port}"
        queue = httpx.get(f"{page}/api/queue", params={"release": "demo", "reviewer": "ana"}, timeout=10).json()
        shown = [s for group in queue["groups"] for s in group["samples"]]
        assert len(shown) == 4 and all("version" not in s for s in shown)  # blind by default
        png = httpx.get(f"{page}/api/image", params={"release": "demo", "id": shown[0]["id"]}, timeout=10)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        rated = httpx.post(f"{page}/api/review", json={"release": "demo", "reviewer": "ana", "request_id": shown[0]["id"], "rating": 2},
                           timeout=10)
        assert rated.status_code == 202, rated.text
        status = json.loads(subprocess.run([DIFFOPS, "status", "--json", "--state-dir", str(controller.state_dir)],
                                           capture_output=True, text=True).stdout)
        [version] = [v for v in status["releases"][0]["versions"] if v["id"] == stable]
        assert version["quality"]["reviews"] == 1 and version["quality"]["mean_rating"] == 2.0

        def reviewed() -> dict[str, float] | None:  # the version's quality lands on its gate's tracking run too
            [run] = gate_runs(f"sqlite:///{controller.state_dir / 'mlflow.db'}", "demo", stable)
            return dict(run.data.metrics) if run.data.metrics.get("live.mean_rating") == 2.0 else None

        live = wait_for(reviewed, 30, "the review on the version's gate run")
        assert live["live.samples"] >= 6 and live["live.reviews"] == 1 and 0 <= live["live.mean_clip_score"] <= 100
        assert live["gate.ok"] == 1

        rollout = CANARY.format(min_requests=1000, quality="      min_mean_rating: 3\n      min_ratings: 3")
        release_with(quality_repo, sampling, rollout, steps=3)
        canary_live = controller.wait_release(lambda r: any(v["role"] == "canary" and v["weight"] == 50 for v in r["versions"]),
                                              timeout=240)
        canary = next(v["id"] for v in canary_live["versions"] if v["role"] == "canary")
        drawn: list[str] = []
        while len(drawn) < 3:
            answer = httpx.post(f"{SERVE_URL}/demo/generate", json={"prompt": "a cat", "steps": 2}, timeout=60)
            assert answer.status_code == 200
            if answer.headers["X-Diffops-Version"] == canary:
                drawn.append(answer.headers["X-Request-Id"])
        for request_id in drawn:
            sent = httpx.post(f"{SERVE_URL}/demo/feedback", json={"request_id": request_id, "rating": 1, "flags": ["artifact"]}, timeout=30)
            assert sent.status_code == 202 and sent.headers["X-Diffops-Version"] == canary
        rolled_back = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=60)
        assert "mean rating 1.00 < 3.0 (3 ratings)" in rolled_back["message"], rolled_back["message"]
        assert {v["id"]: v["weight"] for v in rolled_back["versions"]}[stable] == 100
        rated_canary = quality_report(controller.state_dir)[canary]
        assert rated_canary["ratings"]["histogram"]["1"] == 3 and rated_canary["flags"]["artifact"]["count"] == 3
