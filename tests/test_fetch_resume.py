"""A fetch killed half way (SIGKILL, in another process) and the next one resuming from what landed: the partial
folder and its journal under the node cache (serving/artifacts.py, serving/transfer.py), with 400 MB of weights
from a local store in 16 MiB parts. Retries and resume on object stores: tests/test_transfer.py,
tests/test_store_emulators.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from serving.artifacts import ModelCache, fetch
from serving.manifest import manifest_of
from tests.live import DIFFOPS, wait_for
from tests.test_cache import MB, ROOT, weights_model

FETCH_CHILD = """
import sys
from pathlib import Path
from serving.artifacts import ModelCache, fetch
model, digest, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
print(fetch(f"file://{model}", digest, ModelCache(cache), allowed_roots=(model.parent,)).bytes_transferred)
"""


def start_fetch(model: Path, digest: str, cache: ModelCache) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FETCH_CHILD, str(model), digest, str(cache.root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def partial_dirs(cache: ModelCache) -> list[Path]:
    return [p for p in cache.root.glob(".partial-*")] if cache.root.is_dir() else []


def journalled(cache: ModelCache, digest: str) -> int:
    """Bytes the partial dir's journal says have landed (0 while there is none)."""
    try:
        return sum(entry["landed"] for entry in json.loads((cache.partial(digest) / "landed.json").read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def test_a_fetch_killed_mid_file_is_resumed_by_the_next_one_and_a_running_fetch_is_untouched(tmp_path):
    """400 MB of weights in 16 MiB parts from a local store: another process's sweep never touches a fetch in
    progress; a fetch killed with SIGKILL after some parts leaves them and a true journal, the next cache open keeps
    them, and the next fetch hashes them from disk and reads only the rest, ending with the verified model."""
    from serving.transfer import PART_BYTES

    model, digest = weights_model(tmp_path / "models" / "big", 400 * MB, "big")
    cache = ModelCache(tmp_path / "cache")

    running = start_fetch(model, digest, cache)
    found = wait_for(lambda: partial_dirs(cache), 60, "the fetch to start", every=0.01)
    assert ModelCache(cache.root).sweep() == [] and all(p.exists() for p in found)  # another process's fetch: untouched
    assert running.wait(120) == 0 and int(running.stdout.read()) >= 400 * MB
    assert manifest_of(cache.path(digest)).digest == digest and partial_dirs(cache) == []  # done: nothing left over

    other, other_digest = weights_model(tmp_path / "models" / "other", 400 * MB, "other")
    killed = start_fetch(other, other_digest, cache)
    wait_for(lambda: journalled(cache, other_digest) >= 2 * PART_BYTES, 60, "two parts to land", every=0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    landed = journalled(cache, other_digest)
    assert not cache.path(other_digest).exists() and 0 < landed < 400 * MB  # killed half way
    ModelCache(cache.root)  # the next start keeps a young partial download
    assert partial_dirs(cache) == [cache.partial(other_digest)]

    resumed = fetch(f"file://{other}", other_digest, cache, allowed_roots=(other.parent,))
    total = 400 * MB + (other / "model_index.json").stat().st_size
    assert resumed.resumed_bytes == landed and resumed.bytes_transferred == total - landed
    assert manifest_of(resumed.path).digest == other_digest and partial_dirs(cache) == []
    assert cache.path(digest).is_dir()  # the first verified entry is untouched


def test_model_fetch_from_a_store_that_does_not_answer_exits_2_naming_it(model_repo, tmp_path):
    """`diffops model fetch` of a release whose model is in S3, with nothing listening at the endpoint."""
    model_repo.release(**{"file://models/tiny-sd": "s3://models/tiny-sd"})
    model_repo.commit("the model moved to S3")
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    done = subprocess.run([DIFFOPS, "model", "fetch", "demo", "--state-dir", str(tmp_path / "state")], cwd=model_repo.path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "demo: fetch from s3://models/tiny-sd failed: EndpointConnectionError" in done.stderr and "Traceback" not in done.stderr
    assert "run it again to resume" in done.stderr
