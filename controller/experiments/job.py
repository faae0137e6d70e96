"""The Ray job that draws one model's cells of an experiment: `python -m controller.experiments.job`.

Submitted by `controller.experiments.on_ray` (one job per model, on the release's replica resources) with its
input as the job's working directory (`experiment_input.json`: the model pin, the cells' generation configs, the
prompts). It fetches and verifies the model into the node's cache, loads it once (`controller.experiments.draw`,
which imports only `serving`), and prints one line per cell, `DIFFOPS_EXPERIMENT_CELL <json>` (images as base64,
latencies), which the controller reads from the job's logs. The lines of one job carry at most
`MAX_REPORT_BYTES`; past it the job prints `DIFFOPS_EXPERIMENT_ERROR <json>` naming the cap and exits 1. The job
never writes to MLflow.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["CELL_PREFIX", "ERROR_PREFIX", "INPUT_NAME", "MAX_REPORT_BYTES", "main", "run"]

CELL_PREFIX = "DIFFOPS_EXPERIMENT_CELL "
ERROR_PREFIX = "DIFFOPS_EXPERIMENT_ERROR "
INPUT_NAME = "experiment_input.json"
MAX_REPORT_BYTES = 48 * 2**20
"""Largest total of one job's report lines (48 MiB: 512 images of 64 KiB PNG, base64); a bigger experiment runs locally."""


def run(job: dict[str, Any], emit: Any = print) -> None:
    """Draw every cell of `job`, emitting one report line each; raises ValueError past the report cap."""
    from checks import dependency
    from checks.report import CheckResult, GateReport
    from controller.experiments.draw import draw, load
    from controller.tracking.runs import environment_tags
    from serving.artifacts import ModelCache, fetch
    from serving.model_cache import node_cache_dir

    model = job["model"]
    fetched = fetch(model["uri"], model["digest"], ModelCache(node_cache_dir(job.get("cache_dir"))),
                    repo=Path(job["repo"]) if job.get("repo") else None, commit=job.get("commit"))
    loaded = load(fetched.path, model.get("dtype", "float32"), job["cells"][0]["generation"]["sampler"])
    runtime = job["runtime"]
    checks = (dependency.run(runtime["requires"], runtime["image"], runtime["image_policy"]), dependency.run_cuda(runtime["requires"]),
              CheckResult("load", "passed", "", {"device": loaded.runner.device}))
    environment = environment_tags(GateReport("experiment", "", checks, 0.0))  # where this node drew, as a gate run says it
    sent = 0
    for cell in job["cells"]:
        drawn = draw(loaded, cell["generation"], job["prompts"])
        line = CELL_PREFIX + json.dumps({"index": cell["index"], "images": [base64.b64encode(i).decode() for i in drawn.images],
                                         "latencies": list(drawn.latencies), "wall_s": drawn.wall_s, "device": drawn.device,
                                         "load_s": loaded.load_seconds, "environment": environment})
        sent += len(line)
        if sent > MAX_REPORT_BYTES:
            raise ValueError(f"the cells' images exceed {MAX_REPORT_BYTES // 2**20} MiB of job report; run the experiment without "
                             "--ray-address, or with fewer prompts or smaller images")
        emit(line, flush=True)


def main() -> int:
    try:
        run(json.loads(Path(INPUT_NAME).read_text()))
    except Exception as err:  # noqa: BLE001 - every failure becomes the job's one error line
        print(ERROR_PREFIX + json.dumps({"message": f"{type(err).__name__}: {err}"[:2000]}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
