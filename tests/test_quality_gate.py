"""`checks.quality` through the real gate path (`diffops check`, the tiny pipeline, the tiny CLIP model and safety
checkers): the figures it records, a CLIP score below the threshold failing with the figure in the message, an NSFW
rate over its limit, the distance to the previous gated version, and a prompt set it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from checks.quality import MAX_PROMPT_FILE_BYTES, PromptSetError, parse_prompts
from serving.manifest import manifest_of
from tests.conftest import ROOT, ReleaseRepo
from tests.live import DIFFOPS

PROMPTS = "# the quality prompt set\na red cube\na blue sphere\n\na small cat\n"


def quality_release(repo: ReleaseRepo, check: str, safety: str = "tiny-safety-none", steps: int = 4) -> None:
    for name in ("tiny-clip", safety):
        if not (repo.path / "models" / name).exists():
            shutil.copytree(ROOT / "models" / name, repo.path / "models" / name)
    digest = {name: manifest_of(repo.path / "models" / name).digest for name in ("tiny-clip", safety)}
    quality = (f"  quality:\n    clip: {{uri: file://models/tiny-clip, digest: \"{digest['tiny-clip']}\"}}\n"
               f"    safety: {{uri: file://models/{safety}, digest: \"{digest[safety]}\"}}\n")
    repo.write("releases/prompts/demo.txt", PROMPTS)
    repo.release(**{"    timeout: 2m\n": f"    quality:\n{check}    timeout: 2m\n", "  cost:\n": quality + "  cost:\n", "steps: 4": f"steps: {steps}"})
    repo.commit("quality check")


def check(repo: ReleaseRepo, state_dir: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([DIFFOPS, "check", "demo", "--repo", str(repo.path), "--state-dir", str(state_dir), "-o", "json"],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    return result.returncode, {c["name"]: c for c in report["checks"]}


def test_the_quality_check_records_its_figures_and_fails_below_the_clip_threshold(model_repo: ReleaseRepo, tmp_path: Path) -> None:
    seeds = "      prompts: releases/prompts/demo.txt\n      seeds: [1, 2]\n"
    quality_release(model_repo, seeds + "      min_clip_score: 0\n      max_nsfw_rate: 0\n      max_distance: 1000\n")
    code, checks = check(model_repo, tmp_path / "state")
    passed = checks["quality"]
    assert code == 0 and passed["outcome"] == "passed", passed
    figures = passed["figures"]
    assert figures["images"] == 6 and figures["prompts"] == 3 and figures["nsfw_rate"] == 0.0
    assert 0 <= figures["lowest_clip_score"] <= figures["mean_clip_score"] <= 100
    assert "distance not judged" in passed["message"]  # no earlier version gated on this prompt set

    quality_release(model_repo, seeds + "      min_clip_score: 99\n      max_distance: 1000\n", steps=3)  # another version
    code, checks = check(model_repo, tmp_path / "state")
    failed = checks["quality"]
    assert code == 1 and failed["outcome"] == "failed"
    mean = failed["figures"]["mean_clip_score"]
    assert f"mean CLIP score {mean:.2f} < 99.0 over 6 images (3 prompts x 2 seeds" in failed["message"], failed["message"]
    assert failed["thresholds"]["min_clip_score"] == 99.0
    assert 0 <= failed["figures"]["distance"] <= 1000  # measured against the first version's images


def test_a_checker_that_flags_every_image_fails_the_nsfw_rate(model_repo: ReleaseRepo, tmp_path: Path) -> None:
    quality_release(model_repo, "      prompts: releases/prompts/demo.txt\n      max_nsfw_rate: 0.5\n", safety="tiny-safety-all")
    code, checks = check(model_repo, tmp_path / "state")
    assert code == 1 and "NSFW rate 1.00 > 0.5 (3 of 3 images flagged)" in checks["quality"]["message"]


def test_a_missing_prompt_set_fails_the_check_naming_the_file(model_repo: ReleaseRepo, tmp_path: Path) -> None:
    quality_release(model_repo, "      prompts: releases/prompts/missing.txt\n      min_clip_score: 1\n")
    code, checks = check(model_repo, tmp_path / "state")
    assert code == 1 and "prompt set releases/prompts/missing.txt not found" in checks["quality"]["message"]


def test_prompt_sets_are_refused_past_their_caps() -> None:
    assert parse_prompts("# c\n  one \n\ntwo\n") == ["one", "two"]
    for text, cause in [("", "holds no prompt"), ("\n".join(f"p{n}" for n in range(65)), "holds 65 prompts; the cap is 64"),
                        ("x" * 2001, "longer than 2000 characters"), ("x" * (MAX_PROMPT_FILE_BYTES + 1), "the cap is 65,536 bytes"),
                        (b"\xff\xfe", "not UTF-8")]:
        try:
            parse_prompts(text)
        except PromptSetError as err:
            assert cause in str(err), (cause, err)
        else:
            raise AssertionError(f"{cause}: accepted")
