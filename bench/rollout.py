"""Rollout timings on the live demo, from a commit to the first answer that shows it.

Each change is a git commit to the demo's repo while clients send requests
back to back; a figure is the time from the commit to the first answer that
shows the change (an answer's arrival, so it includes one request's latency:
small requests, two clients).

- light change: `limits.max_prompt_chars` raised; the probe is a prompt longer
  than the old limit (422 before, 200 once the router has the new limits).
  Baseline: a version change's commit to traffic (`generation.steps` + 1: model
  verified, gate as a Ray job, a new replica started and warmed, traffic
  switched).
- warm revert: `git revert` of that version change while the previous version
  is the warm standby. Baseline: a cold rollback of the same version, i.e. the
  same revert with `rollout.scale_down_delay: 0s`, after the old version's app
  is gone (its passed gate is reused; its replica starts from the model cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from bench.context import Context
from bench.live import LiveDemo, field_edit
from bench.progress import Say
from bench.report import Figure, Goal, ratio
from bench.traffic import GENERATE, Watch

SMALL = {"prompt": "a red cube", "steps": 1}
WARM_REVERT_GOAL = Goal("≤ 2 s", "value", at_most=2.0)


def served_by(version: str) -> Callable[[httpx.Response], bool]:
    return lambda response: response.status_code == 200 and response.headers.get("X-Diffops-Version") == version


def served_by_other_than(version: str) -> Callable[[httpx.Response], bool]:
    return lambda response: response.status_code == 200 and response.headers.get("X-Diffops-Version") not in (None, version)


def light_change(live: LiveDemo, say: Say) -> float:
    limit = int(live.field("max_prompt_chars"))
    probe = {"prompt": ("a red cube " * (limit // 10 + 60))[: limit + 500]}
    say(f"light change: max_prompt_chars {limit} -> {limit + 1000}; probing with a {limit + 500}-character prompt")
    with Watch(probe, lambda r: r.status_code == 200, clients=1, pause_s=0.02) as watch:
        time.sleep(0.3)
        commit, at = live.commit_edit(field_edit("max_prompt_chars", limit + 1000), "raise max_prompt_chars")
        seconds = watch.seconds_since(at, timeout_s=120)
    live.wait_applied(commit)
    return seconds


def timed_switch(live: LiveDemo, change: Callable[[], tuple[str, float]], shows: Callable[[httpx.Response], bool],
                 timeout_s: float) -> tuple[float, int]:
    """(seconds from the commit to the first answer showing it, failed answers meanwhile); waits until applied."""
    seconds, failures, commit = first_answer_showing(change, shows, timeout_s)
    live.wait_applied(commit, timeout_s=timeout_s)
    return seconds, failures


def first_answer_showing(change: Callable[[], tuple[str, float]], shows: Callable[[httpx.Response], bool], timeout_s: float,
                         url: str = GENERATE) -> tuple[float, int, str]:
    """(seconds from the commit to the first answer at `url` showing it, failed answers meanwhile, the commit)."""
    with Watch(SMALL, shows, clients=2, url=url) as watch:
        time.sleep(0.3)
        commit, at = change()
        seconds = watch.seconds_since(at, timeout_s)
        time.sleep(0.3)
        failures = watch.failures(at)
    return seconds, failures, commit


def run(live: LiveDemo, say: Say) -> list[Figure]:
    light_s = light_change(live, say)
    old = live.stable().version
    steps = int(live.field("steps"))
    say(f"version change: generation.steps {steps} -> {steps + 1} (gate, new replica, switch)")
    version_s, version_failures = timed_switch(
        live, lambda: live.commit_edit(field_edit("steps", steps + 1), "one more step"), served_by_other_than(old), 300)
    new = live.stable().version
    say(f"warm revert: git revert while {old} is the warm standby")
    warm_s, warm_failures = timed_switch(live, live.revert_head, served_by(old), 120)
    say("cold rollback: scale_down_delay 0s, the same version change again, and its revert once the old app is gone")
    live.set_field("scale_down_delay", "0s")
    live.wait(lambda: live.app_gone(new), f"standby {new} to be deleted")
    commit, _ = live.commit_edit(field_edit("steps", steps + 1), "one more step, again")
    live.wait_applied(commit, timeout_s=300)
    live.wait(lambda: live.app_gone(old), f"{old} to be deleted (no standby kept)")
    cold_s, cold_failures = timed_switch(live, live.revert_head, served_by(old), 300)
    detail = {"light_change_s": round(light_s, 3), "version_change_s": round(version_s, 3), "warm_revert_s": round(warm_s, 3),
              "cold_rollback_s": round(cold_s, 3), "first_rollout_s": round(live.first_rollout_s or 0, 3),
              "failed_answers": {"version_change": version_failures, "warm_revert": warm_failures,
                                 "cold_rollback": cold_failures},
              "versions": {"old": old, "new": new}}
    return [
        Figure("rollout", "light change: commit to traffic", light_s, "s", "version change", version_s,
               ratio(light_s, version_s), detail=detail),
        Figure("rollout", "warm revert: commit to traffic", warm_s, "s", "cold rollback", cold_s,
               ratio(warm_s, cold_s), WARM_REVERT_GOAL, detail),
    ]


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.live(), ctx.say)
