"""Rollout: the pure decisions of a release's next step (`steps`), the canary walk (`canary`), surge capacity (`surge`),
the capacity arithmetic they share (`capacity`) and what a step takes and returns (`outcomes`). Takes what was planned and
observed; returns records for `controller.apply` and `state`."""
