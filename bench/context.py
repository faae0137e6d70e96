"""What a benchmark family gets: its work dir, progress, the run's options, and the shared live resources.

The Ray head and the live demo are started on first use and stopped once at
the end, so `--only reconcile,model_load` never starts Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.live import LiveDemo
from bench.progress import Say
from bench.ray_head import BenchHead


@dataclass
class Shared:
    root: Path
    head: BenchHead | None = None
    demo: LiveDemo | None = None

    def ray(self, say: Say) -> BenchHead:
        if self.head is None:
            say("starting the bench's Ray head (127.0.0.1, GCS :6401, dashboard :8301, Serve :8201)")
            self.head = BenchHead()
            self.head.start()
        return self.head

    def live(self, say: Say) -> LiveDemo:
        if self.demo is None:
            head = self.ray(say)
            self.demo = LiveDemo(self.root / "live", head, say)
            self.demo.start()
            say(f"demo live after {self.demo.first_rollout_s:.1f}s (commit to Healthy, first rollout)")
        return self.demo

    def close(self) -> None:
        if self.demo is not None:
            self.demo.stop()
        if self.head is not None:
            self.head.stop()


@dataclass
class Context:
    workdir: Path
    say: Say
    quick: bool
    shared: Shared
    model_mb: float | None = None

    def ray(self) -> BenchHead:
        return self.shared.ray(self.say)

    def live(self) -> LiveDemo:
        return self.shared.live(self.say)
