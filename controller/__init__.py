"""The daemon and its command line, laid out as one reconcile flows.

    source ─► parse ─► plan ─► gate ─► rollout ─► apply ─► state
    (git)     (YAML)   (diff)  (checks) (steps)   (Serve)  (SQLite, notes)

`reconciler` runs one tick through those steps and `daemon` loops it; `errors`
maps every failure to a phase and a retry in one place; `logs` and `metrics`
are what operators read. `cli` is the `diffops` command on top of them all.
"""
