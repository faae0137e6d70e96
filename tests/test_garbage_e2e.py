"""Garbage committed beside a healthy release, on the real thing: the controller process, a local Ray, the tiny model.

Each garbage file is `Invalid` in `diffops status --json` with `releases/<name>.yaml:<line>:<col>`; the
controller keeps running, the demo keeps answering, and a later change to the demo still reconciles.
"""

from __future__ import annotations

import pytest

from tests.conftest import DEMO_RELEASE
from tests.live import LOAD_REQUEST, Load, generate, healthy_on, serve_client, stable_version

pytestmark = pytest.mark.timeout(600)


def position(text: str, token: str) -> str:
    """'line:col' (1-based) where `token` first appears in `text`."""
    index = text.index(token)
    return f"{text.count(chr(10), 0, index) + 1}:{index - text.rfind(chr(10), 0, index)}"


def named(name: str) -> str:
    return DEMO_RELEASE.replace("name: demo", f"name: {name}")


CONTROL = named("control").replace("negative_prompt: ", "negative_prompt: \x1b[31m ")
HUGE_INT = named("hugeint").replace("steps: 4", "steps: " + "9" * 5000)
OVERFLOW = named("overflow").replace("scale_down_delay: 10m", "scale_down_delay: 99999999999999d")
ESCAPED = named("escaped").replace("negative_prompt: ", 'negative_prompt: "\\ud800" #')
GARBAGE = {
    # name: (file content, 'line:col' the error names, fragment of the message)
    "control": (CONTROL, position(CONTROL, "\x1b"), "control character U+001B"),
    "hugeint": (HUGE_INT, position(HUGE_INT, "9" * 5000), "number is 5000 characters long"),
    "overflow": (OVERFLOW, position(OVERFLOW, "99999999999999d"), "longest duration a release takes, 365d"),
    "junk": (bytes(range(256)) * 4, "2:118", "not UTF-8"),  # byte 128 is the first non-UTF-8 one; byte 10 ends line 1
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(200), "1:1", "not UTF-8"),
    "escaped": (ESCAPED, position(ESCAPED, '"\\ud800"'), "escaped control character U+D800"),
    "dash--dash": (named("dash--dash"), position(named("dash--dash"), "dash--dash"), "contains '--'"),
}


def test_garbage_beside_a_healthy_release(live_demo):
    repo, controller, release = live_demo
    version = stable_version(release)
    for name, (content, _, _) in GARBAGE.items():
        repo.write(f"releases/{name}.yaml", content)

    with Load() as load:
        repo.commit("garbage release files")
        for name, (_, where, fragment) in GARBAGE.items():
            invalid = controller.wait_release(lambda r: r.get("phase") == "Invalid", timeout=60, name=name)
            assert f"releases/{name}.yaml:{where}: " in invalid["message"], (name, where, invalid["message"][:300])
            assert fragment in invalid["message"] and invalid["versions"] == [], invalid["message"][:300]
        load.stop.set()
    assert controller.process.poll() is None, controller.logs[-3000:]
    assert set(load.codes) == {200} and {v for _, v in load.versions} == {version}, load.errors[:3]
    assert not [app for app in serve_client().observe() if any(name in app for name in GARBAGE)]

    repo.release(**{"max_queued_requests: 16": "max_queued_requests: 8"})
    head = repo.commit("a light change to the demo, with the garbage still there")
    changed = controller.wait_release(lambda r: healthy_on(version)(r) and r["desired_commit"] == head, timeout=120)
    assert stable_version(changed) == version
    response = generate(body=LOAD_REQUEST)
    assert response.status_code == 200 and response.headers["X-Diffops-Version"] == version
    assert controller.process.poll() is None
    assert "Traceback" not in controller.logs
    assert {r["name"]: r["phase"] for r in controller.status()["releases"]} == {"demo": "Healthy", **{n: "Invalid" for n in GARBAGE}}
