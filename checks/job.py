"""The gate job's entrypoint, and the package that carries its input: `python -m checks.job`.

The controller packs a gate's input into a small zip (`pack`): `gate_input.json`
(spec, model pin, limits; never the image) and `reference.png` (the golden
reference, as committed). It uploads the zip to the cluster the way Ray's job
client uploads a `working_dir`, and the job runs with that package unpacked as
its working directory, on whichever node Ray picks. So the job's own command
line and environment carry nothing but a pointer (the package URI in its
runtime_env), whatever the size of the reference.

The report leaves as one stdout line `DIFFOPS_GATE_REPORT <json>`, which the
controller reads from the job's logs. `diffops check` goes through the same
package and `run_dir`, so local and cluster gates read their input alike.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["INPUT_NAME", "REFERENCE_MAX_BYTES", "REFERENCE_NAME", "REPORT_PREFIX", "main", "pack", "read_dir", "reference_refusal",
           "run_dir"]

REPORT_PREFIX = "DIFFOPS_GATE_REPORT "
INPUT_NAME = "gate_input.json"
REFERENCE_NAME = "reference.png"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same input makes the same bytes (and package name)
REFERENCE_MAX_BYTES = 16 * 1024 * 1024
"""Largest golden reference PNG the gate reads (16 MiB: a 2048x2048 RGB PNG of pure noise is ~12 MiB)."""


def reference_refusal(path: str, size: int | None) -> str | None:
    """Why a reference of `size` bytes is not read, or None when it is within the cap."""
    if size is None or size <= REFERENCE_MAX_BYTES:
        return None
    return (f"reference {path} is {size / 2**20:.1f} MiB ({size} bytes), over the {REFERENCE_MAX_BYTES // 2**20} MiB "
            f"cap on golden references ({REFERENCE_MAX_BYTES} bytes); commit a smaller PNG, e.g. rendered at the "
            f"release's size with `diffops golden RELEASE --write`")


def _entry(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


def pack(gate: dict[str, Any]) -> bytes:
    """A gate input as a deterministic zip: the JSON without the image, and the image as its own file."""
    reference = gate.get("reference")
    document = {key: value for key, value in gate.items() if key != "reference"}
    document["reference_file"] = REFERENCE_NAME if reference is not None else None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(_entry(INPUT_NAME, zipfile.ZIP_DEFLATED), json.dumps(document, sort_keys=True, indent=1))
        if reference is not None:
            archive.writestr(_entry(REFERENCE_NAME, zipfile.ZIP_STORED), reference)  # a PNG is compressed already
    return buffer.getvalue()


def read_dir(directory: Path) -> dict[str, Any]:
    """The gate input from an unpacked package; the reference is read only if it is within the cap."""
    gate: dict[str, Any] = json.loads((directory / INPUT_NAME).read_text())
    name = gate.pop("reference_file", None)
    gate["reference"] = None
    if name is not None:
        path = directory / name
        size = path.stat().st_size
        gate["reference_bytes"] = max(size, int(gate.get("reference_bytes") or 0))
        if size <= REFERENCE_MAX_BYTES:
            gate["reference"] = path.read_bytes()
    return gate


def run_dir(directory: Path, progress: Any = lambda line: None, **options: Any) -> Any:
    """Run the gate on an unpacked package (the job's working directory); returns the GateReport."""
    from checks.gate import run_gate

    return run_gate(read_dir(directory), progress=progress, **options)


def main() -> None:
    report = run_dir(Path.cwd(), progress=lambda line: print(line, flush=True))
    print(REPORT_PREFIX + json.dumps(report.to_dict()), flush=True)
    sys.stdout.flush()
    os._exit(0)  # a check stuck past its limit must not keep the job alive


if __name__ == "__main__":
    main()
