"""Cost accounting: GPU-seconds held, bytes fetched, model bytes stored, images made, priced. Pure.

Run once per reconcile after the record phase (`controller.tick.costs` holds
the state and writes it): `account` integrates, per recorded version, what the
controller holds since the last tick:

- GPU-seconds = replicas x `replicas.gpus` x elapsed, for versions whose
  replicas exist (starting, ready, retiring). A standby version's are
  `standby`; a version's busy share (the pipeline seconds its replicas
  report to the release's tally, `serving.tally`, x its GPUs per replica) is
  `serving`, the rest `idle`. When the tally cannot be read, a version taking
  traffic counts all of its held time as `serving` (an upper bound), one that
  is not as `idle`.
- gate jobs: the gate's seconds x `replicas.gpus` (one replica's resources).
- egress: bytes the controller fetched from object stores (s3, gs, az, hf).
- storage: the version's model bytes in the model cache x elapsed.

Prices come from the release's `spec.cost` (`gpu_hour_usd`,
`egress_usd_per_gb`, `storage_usd_per_gb_month`); an unset price costs
nothing, while the quantities are counted all the same. Totals only grow;
`window` takes the difference between two of them (cost per image over a
window = cost in it / images made in it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from controller.parse.release import Cost
from controller.state.records import VersionRecord

__all__ = ["GPU_KINDS", "HOLDING", "MONTH_S", "OBJECT_STORES", "USD_KINDS", "CostRecord", "Fetch", "GateRun", "Work", "account",
           "cost_per_image", "held_gpus", "integrate", "window"]

GpuKind = Literal["serving", "idle", "standby", "gate"]
GPU_KINDS: tuple[GpuKind, ...] = ("serving", "idle", "standby", "gate")
USD_KINDS = ("gpu", "egress", "storage")
HOLDING = frozenset({"starting", "ready", "retiring"})  # statuses whose replicas exist (and hold their GPUs)
OBJECT_STORES = frozenset({"s3", "gs", "az", "hf"})  # fetches from these are billed egress; file:// reads are not
MONTH_S = 30 * 86400
GB = 1e9


@dataclass(frozen=True)
class Work:
    """A version's running totals at its release's tally: pipeline seconds (all replicas) and images made."""

    epoch: str  # the tally's; a new one (the router app restarted) starts the totals from zero
    busy_s: float
    images: int


@dataclass(frozen=True)
class GateRun:
    release: str
    version: str
    seconds: float
    gpus: float  # one replica's GPUs: what the gate job held


@dataclass(frozen=True)
class Fetch:
    release: str
    version: str
    store: str  # the URI scheme
    bytes: int


@dataclass(frozen=True)
class CostRecord:
    """One version's totals since the controller first saw it (recorded in the state store, never reset)."""

    release: str
    version: str
    at: float  # when these totals were integrated up to (epoch seconds)
    serving_s: float = 0.0  # GPU-seconds, by kind
    idle_s: float = 0.0
    standby_s: float = 0.0
    gate_s: float = 0.0
    images: int = 0
    egress_bytes: int = 0
    storage_gb_s: float = 0.0  # GB x seconds of model bytes kept in the cache
    gpu_usd: float = 0.0
    egress_usd: float = 0.0
    storage_usd: float = 0.0
    work_epoch: str | None = None  # the last tally reading these totals took in (its differences are counted)
    work_busy_s: float = 0.0
    work_images: int = 0

    def gpu_seconds(self, kind: GpuKind) -> float:
        return float(getattr(self, f"{kind}_s"))

    @property
    def usd(self) -> float:
        return self.gpu_usd + self.egress_usd + self.storage_usd


_TOTALS = ("serving_s", "idle_s", "standby_s", "gate_s", "images", "egress_bytes", "storage_gb_s", "gpu_usd", "egress_usd",
           "storage_usd")


def held_gpus(version: VersionRecord) -> float:
    """GPUs a version's replicas hold now (none while it is prepared or gated)."""
    if version.status not in HOLDING:
        return 0.0
    replicas = version.replicas if version.replicas is not None else version.spec.replicas.count
    return replicas * version.spec.replicas.gpus


def _gpu_usd(gpu_seconds: float, cost: Cost) -> float:
    return gpu_seconds / 3600 * cost.gpu_hour_usd if cost.gpu_hour_usd else 0.0


def _busy(record: CostRecord, work: Work | None) -> tuple[float | None, int]:
    """Pipeline seconds and images since the record's last tally reading (None seconds: no reading)."""
    if work is None:
        return None, 0
    if work.epoch != record.work_epoch or work.busy_s < record.work_busy_s or work.images < record.work_images:
        return work.busy_s, work.images  # a new tally counts from zero
    return work.busy_s - record.work_busy_s, work.images - record.work_images


def integrate(record: CostRecord, version: VersionRecord, now: float, work: Work | None, cost: Cost,
              model_bytes: float = 0.0) -> CostRecord:
    """The record advanced to `now`: held GPU time split by kind, images, model bytes stored; priced by `cost`."""
    elapsed = max(0.0, now - record.at)
    held = held_gpus(version) * elapsed
    busy_s, images = _busy(record, work)
    per_replica = version.spec.replicas.gpus
    serving = idle = standby = 0.0
    if version.role == "standby":
        standby = held
    elif busy_s is None:
        serving, idle = (held, 0.0) if version.weight > 0 else (0.0, held)
    else:
        serving = min(held, busy_s * per_replica)
        idle = held - serving
    stored = model_bytes / GB * elapsed
    storage_usd = stored / MONTH_S * cost.storage_usd_per_gb_month if cost.storage_usd_per_gb_month else 0.0
    advanced = replace(record, at=max(record.at, now), serving_s=record.serving_s + serving, idle_s=record.idle_s + idle,
                       standby_s=record.standby_s + standby, images=record.images + images,
                       storage_gb_s=record.storage_gb_s + stored, gpu_usd=record.gpu_usd + _gpu_usd(held, cost),
                       storage_usd=record.storage_usd + storage_usd)
    if work is not None:
        advanced = replace(advanced, work_epoch=work.epoch, work_busy_s=work.busy_s, work_images=work.images)
    return advanced


def account(records: Mapping[tuple[str, str], CostRecord], versions: Iterable[VersionRecord], now: float,
            prices: Mapping[str, Cost], work: Mapping[tuple[str, str], Work] | None = None,
            gates: Iterable[GateRun] = (), fetches: Iterable[Fetch] = (),
            model_bytes: Mapping[tuple[str, str], float] | None = None) -> dict[tuple[str, str], CostRecord]:
    """Every version's totals after this tick. `prices`: each release's `spec.cost` (unlisted: no prices); `work`:
    the tally readings per (release, version) (absent: not readable this tick); `model_bytes`: the cache bytes
    each version's model takes, shared out among versions pinning one model. Versions no longer recorded keep
    their totals (`diffops cost` reports them)."""
    out = dict(records)
    work, model_bytes = work or {}, model_bytes or {}
    for version in versions:
        key = (version.release, version.version)
        cost = prices.get(version.release, Cost())
        record = out.get(key)
        if record is None:  # first seen: counted from now on
            record = CostRecord(version.release, version.version, now)
        out[key] = integrate(record, version, now, work.get(key), cost, model_bytes.get(key, 0.0))
    for gate in gates:
        key = (gate.release, gate.version)
        cost = prices.get(gate.release, Cost())
        record = out.get(key) or CostRecord(gate.release, gate.version, now)
        gpu_s = max(0.0, gate.seconds) * gate.gpus
        out[key] = replace(record, gate_s=record.gate_s + gpu_s, gpu_usd=record.gpu_usd + _gpu_usd(gpu_s, cost))
    for fetch in fetches:
        if fetch.store not in OBJECT_STORES:
            continue
        key = (fetch.release, fetch.version)
        cost = prices.get(fetch.release, Cost())
        record = out.get(key) or CostRecord(fetch.release, fetch.version, now)
        usd = fetch.bytes / GB * cost.egress_usd_per_gb if cost.egress_usd_per_gb else 0.0
        out[key] = replace(record, egress_bytes=record.egress_bytes + fetch.bytes, egress_usd=record.egress_usd + usd)
    return out


def window(now: CostRecord, before: CostRecord | None) -> CostRecord:
    """What was added between `before` (None: nothing yet) and `now`: the totals' differences, stamped `now.at`."""
    if before is None:
        return now
    differences = {name: getattr(now, name) - getattr(before, name) for name in _TOTALS}
    return replace(now, **differences)


def cost_per_image(record: CostRecord) -> float | None:
    """USD per image (GPU, egress and storage), or None when no image was made."""
    return record.usd / record.images if record.images > 0 else None

