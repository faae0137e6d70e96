"""Rollout: the pure decisions of a release's next step (`steps`), the canary walk (`canary`) and surge
capacity (`surge`). Takes what was planned and observed; returns records for `controller.apply` and `state`."""
