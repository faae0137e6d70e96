"""Has a gate job failed to start? A pure decision the Ray-job gate asks on every poll.

A job Ray cannot start (its worker dies at start, nothing in the cluster has
the resources it asks for, its runtime environment never comes up) stays
PENDING, and Ray's own start timeout is 15 minutes. The gate gives it a start
deadline scaled from what it asks for instead: `base` seconds for a CPU gate
(120 s unless `DIFFOPS_GATE_START_DEADLINE_S` says otherwise), three times that
when it asks for GPUs (a GPU node takes minutes to provision and pull its
image). Past it, the gate fails with Ray's own status message and what the
job asked for, so the release says why instead of sitting in `Progressing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_START_BASE_S", "GPU_FACTOR", "NOT_STARTED", "Fail", "KeepWaiting", "StartVerdict", "asked", "start_deadline_s",
           "start_verdict"]

DEFAULT_START_BASE_S = 120.0
GPU_FACTOR = 3.0
NOT_STARTED = {"PENDING", "UNKNOWN"}  # UNKNOWN: Ray does not (yet, or any longer) report the job


@dataclass(frozen=True)
class KeepWaiting:
    """The job started, finished, or is still within its start deadline."""


@dataclass(frozen=True)
class Fail:
    """The job did not start in time; `reason` says what Ray said and what it asked for."""

    reason: str


StartVerdict = KeepWaiting | Fail


def start_deadline_s(gpus: float, base_s: float = DEFAULT_START_BASE_S) -> float:
    """How long a gate job asking for `gpus` may stay PENDING."""
    return base_s * (GPU_FACTOR if gpus > 0 else 1.0)


def asked(cpus: float, gpus: float, resources: dict[str, float] | None = None) -> str:
    """What a gate job asks Ray for, for people: `0.5 CPU, 1 GPU, 1 gpu-pool-a100`."""
    parts = [f"{cpus:g} CPU", f"{gpus:g} GPU"] + [f"{amount:g} {name}" for name, amount in sorted((resources or {}).items())]
    return ", ".join(parts)


def start_verdict(status: str, message: str, pending_s: float, cpus: float, gpus: float,
                  resources: dict[str, float] | None = None, base_s: float = DEFAULT_START_BASE_S) -> StartVerdict:
    """Keep waiting for a gate job, or fail it because it did not start in time (with Ray's reason)."""
    if status not in NOT_STARTED:
        return KeepWaiting()  # running or finished: the start deadline no longer applies
    deadline = start_deadline_s(gpus, base_s)
    if not math.isfinite(pending_s) or pending_s < deadline:
        return KeepWaiting()
    said = " ".join((message or "").split()) or "no status message"
    scaled = f"{base_s:g}s x{GPU_FACTOR:g} for a GPU gate" if gpus > 0 else f"{base_s:g}s for a CPU gate"
    return Fail(f"gate job did not start within {deadline:g}s ({scaled}); it asked for {asked(cpus, gpus, resources)}; "
                f"Ray says ({status}): {said}; free those resources in the cluster or lower the release's replicas "
                f"resources, then `diffops retry`")
