"""`python -m bench` (`make bench`): run the benchmark families, print the table, write the JSON.

    python -m bench [--only reconcile,model_load] [--quick] [--out bench/results.json] [--markdown]

Families run in a fixed order (those without Ray first); one that fails is
reported and the rest go on. The exit status is 1 if any family failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import batching, cluster, fetch, gate, model_load, quality, reconcile, rollout, router
from bench.context import Context, Shared
from bench.progress import Progress
from bench.report import Figure, document, markdown, table

FAMILIES: dict[str, Callable[[Context], list[Figure]]] = {
    "reconcile": reconcile.bench,
    "model_load": model_load.bench,
    "fetch": fetch.bench,
    "gate": gate.bench,
    "router": router.bench,
    "batching": batching.bench,
    "rollout": rollout.bench,
    "cluster": cluster.bench,
    "quality": quality.bench,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="diffops benchmarks: every figure against a baseline from the same run.")
    parser.add_argument("--only", default=",".join(FAMILIES),
                        help=f"comma-separated families (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer requests (for development; figures are noisier)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON (default: bench/results.json)")
    parser.add_argument("--model-mb", type=float, default=None,
                        help="size of the synthetic model for model_load (default 1000, 200 with --quick)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (repos, controller log) for inspection")
    args = parser.parse_args(argv)
    args.families = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.families if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    return args


def about(args: argparse.Namespace, argv: list[str], load_at_start: tuple[float, ...]) -> dict[str, object]:
    import ray
    import torch

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *argv]),
        "quick": args.quick,
        "families": args.families,
        "machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "load_average_start": load_at_start, "load_average_end": os.getloadavg()},
    }


def stop_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C, so the controller and Ray head are cleaned up."""
    def handle(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, handle)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    stop_on_sigterm()
    load_at_start = os.getloadavg()  # other work on the machine skews latencies; the JSON says how busy it was
    progress = Progress()
    root = Path(tempfile.mkdtemp(prefix="dbench-work-"))
    shared = Shared(root)
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    try:
        for name in FAMILIES:
            if name not in args.families:
                continue
            say = progress.for_family(name)
            workdir = root / name
            workdir.mkdir()
            started = time.monotonic()
            try:
                found = FAMILIES[name](Context(workdir, say, args.quick, shared, args.model_mb))
            except Exception as err:  # one family failing must not lose the others' figures
                failures[name] = f"{type(err).__name__}: {err}"
                say(f"FAILED after {time.monotonic() - started:.0f}s: {failures[name]}")
                traceback.print_exc(file=sys.stderr)
                continue
            figures += found
            say(f"done in {time.monotonic() - started:.0f}s")
    finally:
        progress.for_family("bench")("stopping the controller and the bench's Ray head" if shared.head else "cleaning up")
        shared.close()
        if args.keep:
            progress.for_family("bench")(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(table(figures))
    if args.markdown:
        print()
        print(markdown(figures))
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    print(f"{os.cpu_count()} CPUs; load average (1 min) {load_at_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document(figures, failures, about(args, argv, load_at_start)), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
