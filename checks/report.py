"""Gate results: one `CheckResult` per check, gathered in a `GateReport`.

Plain data that travels as JSON (from the gate job to the controller, into
SQLite, out of `diffops check --format json`). Every figure is kept, pass or fail.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["CheckResult", "GateReport", "Outcome", "failed"]

Outcome = Literal["passed", "failed", "skipped", "error"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def blocking(self) -> bool:
        return self.outcome in ("failed", "error")


@dataclass(frozen=True)
class GateReport:
    release: str
    version: str
    checks: tuple[CheckResult, ...]
    seconds: float
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> base64 PNG (golden image, comparison)
    job: str | None = None  # the Ray job that ran the checks (its submission id); None when run locally

    @property
    def ok(self) -> bool:
        return not any(check.blocking for check in self.checks)

    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if check.blocking]

    def summary(self) -> str:
        """One line: every failure with its figure and threshold, or every check's outcome."""
        failed = self.failures()
        if failed:
            return "; ".join(f"{c.name} check failed: {c.message}" for c in failed)
        return ", ".join(f"{c.name} {c.outcome}" for c in self.checks) + f" in {self.seconds:.1f}s"

    def save_artifacts(self, folder: Path) -> list[Path]:
        """Write the report's images (golden produced / comparison) into `folder`; return their paths."""
        saved = []
        for name, data in self.artifacts.items():
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_bytes(base64.b64decode(data))
            saved.append(path)
        return saved

    def to_dict(self, with_artifacts: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        if not with_artifacts:
            data.pop("artifacts")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateReport:
        checks = tuple(CheckResult(**c) for c in data["checks"])
        return cls(data["release"], data["version"], checks, data["seconds"], data.get("artifacts") or {}, data.get("job"))


def failed(name: str, message: str, **figures: Any) -> CheckResult:
    return CheckResult(name, "failed", message, figures)
