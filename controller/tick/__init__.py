"""One reconcile as named phases, run in this order by `controller.reconciler`.

    observe ─► decide ─► record ─► apply ─► annotate
    (Serve,    (pure:     (SQLite,  (Serve    (git notes,
     git, Ray)  a Plan)    events)   config)   reverts)

- `observe`: what Ray Serve runs (ours and others'), routers' confirmed weights,
  free resources, finished model preparations, pending commands, and per
  release what its step reads (gate key, canary figures): one `TickInput`.
- `decide`: pure; every release's rollout step (`controller.rollout.steps`),
  a failing step mapped to its phase (`controller.errors`): one `Plan`.
- `record`: the plan's state, events, gate reports and consumed commands in one
  SQLite transaction, before anything is acted on; then one log line per
  decision and the state gauges.
- `apply`: render and apply the Serve config (drift healed), start model
  preparations in the background (`prepare`), keep the model cache under its cap.
- `annotate`: a git note per decision on its commit, a revert commit for an
  automatic rollback, pushed when the repository is a mirror.
"""

__all__: list[str] = []
