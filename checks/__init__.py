"""Checks: the gate a version passes before it takes traffic, run as a Ray job on the release's own resources.

Its schema (`schema`), one module per check (`artifact`, `dependency`, `golden` with `imagecompare`,
`performance`), their results (`report`), the runner (`gate`) and the job's entrypoint (`job`). Imports
`serving` (it loads the pipeline the way a replica does), never `controller`.
"""
