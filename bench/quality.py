"""Quality loop cost: generate latency with the release's scorer and its safety checker on, against off, in one run.

On the live demo at max_batch_size 1 (the tiny CLIP model and the safety
checker that flags nothing, models/, committed into the bench's repo as the
demo model is), sequential `POST /demo/generate` (the demo's generation
config, the same seeds in every block) in three settings of the release:

- *off*: no `quality` section (the demo as is);
- *scorer*: `quality.clip` (tiny-clip, sample_rate 1) and `quality.review.sample_rate` 1: every answer is sent to
  the release's scorer, fire and forget, and CLIP-scored there. A light change: the router application gains its
  scorer, the version stays;
- *scorer + checker*: the same plus `quality.safety` (tiny-safety-none, action flag): every image is checked inside
  the version's replica, on the request path. A new version (gate, then a replica started).

Each switch is a commit of the release file, waited on until applied (the router application running with or
without its scorer, the expected version stable and Healthy). The new version is made first; after that every
switch is a light change or a flip to the other version kept warm as standby (`rollout.scale_down_delay`), so the
settings are measured in rounds of one block each (ABC, then CBA, ...) and background load hits all three alike.
A block is a few warm-up requests (not counted), the block's requests back to back, then the same requests again
`PAUSE_S` apart (*paced*): back to back, the scorer's CLIP work and the controller's read of the samples run on
the same cores as the next request; paced, they are done before it starts, which leaves the request path alone.
Every answer must name the version its setting runs, and in a scorer block the scorer must take every answer
(its sample book's count). After each round the checker's own cost is measured in this process:
`SafetyFilter.apply` on one image the demo drew (64×64), with the torch threads a replica gets, as the replica
calls it. Figures: scorer cost = scorer percentile − off percentile (goal ≤ 1 ms p50: it is off the request
path); checker cost = (scorer + checker) − scorer percentile, against the in-process check (goal: no more than
it + 2 ms at p50). Percentiles are of all the setting's requests (not per-request differences); the detail keeps
each round's p50s. The release file is restored at the end.
"""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import in_process
from bench.context import Context
from bench.gitrepo import ROOT
from bench.live import LiveDemo
from bench.progress import Say
from bench.ray_head import SERVE_URL
from bench.report import Figure, Goal, ratio
from bench.traffic import expect_ok, percentile_ms, timed_post
from serving.manifest import manifest_of

SETTINGS = ("off", "scorer", "scorer + checker")
CLIP, SAFETY = "tiny-clip", "tiny-safety-none"
ROUNDS, QUICK_ROUNDS = 6, 4  # even: each setting as often first in a round as last
BLOCK, QUICK_BLOCK = 30, 20
WARM_UP = 3
CHECKS = 20  # in-process checker calls per round
PAUSE_S = 0.1  # before each paced request: longer than the scorer's work on one sample
VERSION_HEADER = "X-Diffops-Version"
SCORER_GOAL = Goal("≤ 1 ms p50", "value", at_most=1.0)
CHECKER_MARGIN_MS = 2.0


def pin(uri: str, digest: str) -> str:
    return f"      uri: {uri}\n      digest: \"{digest}\"\n"


def quality_section(setting: str, clip_digest: str, safety_digest: str) -> str:
    """The release file's `quality:` block for a setting ('' for off)."""
    if setting == "off":
        return ""
    text = f"  quality:\n    review:\n      sample_rate: 1\n    clip:\n{pin(f'file://models/{CLIP}', clip_digest)}      sample_rate: 1\n"
    if setting == "scorer + checker":
        text += f"    safety:\n{pin(f'file://models/{SAFETY}', safety_digest)}      action: flag\n"
    return text


def with_quality(base: str, section: str) -> str:
    """The release text with `section` before its `cost:` block (the demo has no quality section of its own)."""
    if "\n  quality:" in base:
        raise ValueError("the release already has a quality section; start from the demo release")
    if "\n  cost:\n" not in base:
        raise ValueError("the release has no `cost:` block to put the quality section before")
    return base.replace("\n  cost:\n", f"\n{section}  cost:\n", 1)


def round_order(number: int) -> tuple[str, ...]:
    """ABC, CBA, ABC, ...: each setting is as often first as last, so drift within a round cancels out."""
    return SETTINGS if number % 2 == 0 else SETTINGS[::-1]


@dataclass
class Samples:
    """Latencies (seconds) per setting, and per round, and the in-process checker's."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETTINGS})  # back to back
    paced: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETTINGS})  # PAUSE_S before each
    rounds: list[dict[str, float]] = field(default_factory=list)  # p50 ms per setting, per round
    checker: list[float] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)  # samples the scorer took per scorer block


def quantiles(seconds: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile_ms(seconds, q), 2) for q in (50, 99)}


def cost_figures(kind: str, by_setting: dict[str, list[float]], checker: list[float], qs: tuple[int, ...],
                 detail: dict[str, Any]) -> list[Figure]:
    """Scorer cost (scorer − off) and checker cost ((scorer + checker) − scorer, against the in-process check) at `qs`."""
    off, scorer, both = (by_setting[s] for s in SETTINGS)
    out = []
    for q in qs:
        off_ms, scorer_ms = percentile_ms(off, q), percentile_ms(scorer, q)
        out.append(Figure("quality", f"quality scorer cost p{q}, {kind}", scorer_ms - off_ms, "ms", f"quality off p{q}", off_ms,
                          ratio(scorer_ms, off_ms), SCORER_GOAL if q == 50 else None, detail))
    for q in qs:
        scorer_ms, both_ms, check_ms = percentile_ms(scorer, q), percentile_ms(both, q), percentile_ms(checker, q)
        goal = Goal(f"≤ in-process check + {CHECKER_MARGIN_MS:.0f} ms p50 ({check_ms + CHECKER_MARGIN_MS:.1f} ms)", "value",
                    at_most=check_ms + CHECKER_MARGIN_MS) if q == 50 else None
        out.append(Figure("quality", f"safety checker cost p{q}, {kind}", both_ms - scorer_ms, "ms", f"in-process check p{q}",
                          check_ms, ratio(both_ms - scorer_ms, check_ms), goal, detail))
    return out


def figures(samples: Samples, detail: dict[str, Any]) -> list[Figure]:
    """Back to back: scorer and checker cost at p50 and p99, and both together at p50; paced: both costs at p50."""
    detail = {**detail, "requests_per_setting": len(samples.latencies["off"]), "rounds_p50_ms": samples.rounds,
              "samples_taken_per_scorer_block": samples.scored,
              "back_to_back_ms": {s: quantiles(samples.latencies[s]) for s in SETTINGS},
              "paced_ms": {s: quantiles(samples.paced[s]) for s in SETTINGS},
              "checker_in_process_ms": quantiles(samples.checker), "checker_calls": len(samples.checker)}
    out = cost_figures("back to back", samples.latencies, samples.checker, (50, 99), detail)
    off_ms, both_ms = percentile_ms(samples.latencies["off"], 50), percentile_ms(samples.latencies["scorer + checker"], 50)
    out.append(Figure("quality", "scorer + safety checker cost p50, back to back", both_ms - off_ms, "ms", "quality off p50",
                      off_ms, ratio(both_ms, off_ms), None, detail))
    return out + cost_figures(f"paced ({PAUSE_S * 1000:.0f} ms apart)", samples.paced, samples.checker, (50,), detail)


class QualityRun:
    """The live demo switched between the three settings, and the measurements."""

    def __init__(self, live: LiveDemo, say: Say, block: int):
        self.live, self.say, self.block = live, say, block
        self.texts: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.current = "off"
        self.scored: list[int] = []  # samples the scorer took per scorer block
        self.detail: dict[str, Any] = {}
        self.client = httpx.Client(timeout=60)
        self.bodies = [{"prompt": "a red cube", "seed": seed} for seed in range(block)]

    def prepare(self) -> None:
        """Quality models committed beside the demo model; max_batch_size 1; each setting's text and version."""
        repo = self.live.repo.path
        for name in (CLIP, SAFETY):
            if not (repo / "models" / name).exists():
                shutil.copytree(ROOT / "models" / name, repo / "models" / name)
        self.live.repo.commit("tiny quality models")
        self.live.set_field("max_batch_size", 1)
        base = self.live.repo.release_text()
        clip, safety = (manifest_of(repo / "models" / name).digest for name in (CLIP, SAFETY))
        self.texts = {s: with_quality(base, quality_section(s, clip, safety)) for s in SETTINGS}
        self.versions["off"] = self.versions["scorer"] = self.live.stable().version
        started = time.monotonic()
        self.say("scorer + checker: committing quality.safety (a new version: gate, then a replica); waiting until it is stable")
        self.switch("scorer + checker", timeout_s=360)
        self.versions["scorer + checker"] = self.live.stable().version
        if self.versions["scorer + checker"] == self.versions["off"]:
            raise RuntimeError("quality.safety did not make a new version; check controller/plan/versions.py")
        self.say(f"scorer + checker: version {self.versions['scorer + checker']} stable after {time.monotonic() - started:.0f}s")

    def switch(self, setting: str, timeout_s: float = 180) -> float:
        """Commit the setting's release text; wait until applied, with or without the scorer. Returns seconds taken."""
        started = time.monotonic()
        if setting == self.current:
            return 0.0
        text = self.texts[setting]
        commit, _ = self.live.commit_edit(lambda _: text, f"quality: {setting}")
        self.current = setting
        self.live.wait_applied(commit, timeout_s)
        scorer = setting != "off"

        def router_settled() -> bool:
            router = (self.live.observe() or {}).get("demo")
            return bool(router and router.ready and bool((router.args or {}).get("scorer")) == scorer)

        self.live.wait(router_settled, f"the router application {'with' if scorer else 'without'} its scorer", timeout_s)
        return time.monotonic() - started

    def scorer_mark(self) -> tuple[str | None, int]:
        """(epoch, last seq) of the scorer's sample book."""
        response = self.client.get(f"{SERVE_URL}/demo/samples", params={"after": 0, "limit": 1})
        if response.status_code != 200:
            raise RuntimeError(f"GET /demo/samples answered {response.status_code}: {response.text[:300]}")
        page = response.json()
        return page["epoch"], int(page["last"])

    def taken_since(self, mark: tuple[str | None, int], sent: int) -> int:
        """Samples the scorer took after `mark`, waiting a little for it to catch up (not part of any latency)."""
        deadline, taken = time.monotonic() + 15, 0
        while time.monotonic() < deadline:
            epoch, last = self.scorer_mark()
            taken = last - mark[1] if epoch == mark[0] else last
            if taken >= sent:
                break
            time.sleep(0.2)
        return taken

    def answer(self, setting: str, body: dict[str, Any]) -> float:
        """One request's seconds; it must be answered by the setting's version."""
        seconds, response = timed_post(self.client, body)
        expect_ok(response)
        if response.headers.get(VERSION_HEADER) != self.versions[setting]:
            raise RuntimeError(f"{setting}: answered by {response.headers.get(VERSION_HEADER)}, expected "
                               f"{self.versions[setting]}; the switch was not complete")
        return seconds

    def measure(self, setting: str) -> tuple[list[float], list[float]]:
        """(back to back, paced) latencies: the block's requests one at a time, then again with a pause between."""
        for body in self.bodies[:WARM_UP]:
            self.answer(setting, body)
        mark = self.scorer_mark() if setting != "off" else None
        back_to_back = [self.answer(setting, body) for body in self.bodies]
        paced = []
        for body in self.bodies:
            time.sleep(PAUSE_S)  # the scorer and the controller's read of its samples finish their share first
            paced.append(self.answer(setting, body))
        if mark is not None:
            sent = 2 * len(self.bodies)
            taken = self.taken_since(mark, sent)
            if taken < sent:
                raise RuntimeError(f"{setting}: the scorer took {taken} samples of {sent} answers; "
                                   "read its log (the Serve logs of the demo's Scorer)")
            self.scored.append(taken)
        return back_to_back, paced

    def demo_image(self) -> Any:
        from PIL import Image

        png = expect_ok(timed_post(self.client, self.bodies[0])[1]).content
        return Image.open(io.BytesIO(png)).convert("RGB")

    def run(self, rounds: int) -> Samples:
        from serving.safety import load_filter

        samples = Samples(scored=self.scored)
        checker = load_filter(self.live.repo.path / "models" / SAFETY, "flag", "cpu")
        image = self.demo_image()
        threads = in_process.replica_threads(self.live.stable().spec.replicas.cpus)
        switches: list[float] = []
        for number in range(rounds):
            p50s = {}
            for setting in round_order(number):
                seconds = self.switch(setting)
                if seconds:
                    switches.append(round(seconds, 2))
                block, paced = self.measure(setting)
                samples.latencies[setting] += block
                samples.paced[setting] += paced
                p50s[setting] = round(percentile_ms(block, 50), 2)
                p50s[f"{setting}, paced"] = round(percentile_ms(paced, 50), 2)
            with in_process.torch_threads(threads):
                checker.apply([image])  # warm-up
                for _ in range(CHECKS):
                    started = time.perf_counter()
                    checker.apply([image])
                    samples.checker.append(time.perf_counter() - started)
            samples.rounds.append(p50s)
            self.say(f"round {number + 1}/{rounds}: p50 ms {p50s}, in-process check "
                     f"{percentile_ms(samples.checker[-CHECKS:], 50):.1f} ms")
        self.detail = {"image_size": list(image.size), "torch_threads": threads, "versions": self.versions,
                       "switch_s": switches, "warm_up_per_block": WARM_UP,
                       "pause_s": PAUSE_S}
        return samples

    def close(self, original: str) -> None:
        self.client.close()
        if self.live.repo.release_text() != original:
            commit, _ = self.live.commit_edit(lambda _: original, "quality bench: the release as it was")
            self.live.wait_applied(commit)


def run(live: LiveDemo, say: Say, rounds: int, block: int) -> list[Figure]:
    original = live.repo.release_text()
    quality = QualityRun(live, say, block)
    try:
        quality.prepare()
        say(f"{rounds} rounds of {len(SETTINGS)} blocks of {block} requests ({', '.join(SETTINGS)}), then {CHECKS} in-process checks")
        samples = quality.run(rounds)
    finally:
        say("restoring the release file")
        quality.close(original)
    return figures(samples, quality.detail)


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.live(), ctx.say, QUICK_ROUNDS if ctx.quick else ROUNDS, QUICK_BLOCK if ctx.quick else BLOCK)
