"""The gate job's entrypoint: `python -m checks.job`, submitted by the controller as a Ray job.

Ray schedules it with the release's own CPUs and GPUs. The input arrives
base64-encoded in `DIFFOPS_GATE_INPUT`; the report leaves as one stdout line
`DIFFOPS_GATE_REPORT <json>`, which the controller reads from the job's logs.
"""

from __future__ import annotations

import base64
import json
import os
import sys

REPORT_PREFIX = "DIFFOPS_GATE_REPORT "


def main() -> None:
    from checks.gate import run_gate

    gate_input = json.loads(base64.b64decode(os.environ["DIFFOPS_GATE_INPUT"]))
    if gate_input.get("reference"):
        gate_input["reference"] = base64.b64decode(gate_input["reference"])
    report = run_gate(gate_input, progress=lambda line: print(line, flush=True))
    print(REPORT_PREFIX + json.dumps(report.to_dict()), flush=True)
    sys.stdout.flush()
    os._exit(0)  # a check stuck past its limit must not keep the job alive


if __name__ == "__main__":
    main()
