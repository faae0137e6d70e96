"""Tracking and registry on MLflow: gate runs, experiments and registered models.

`runs` turns what diffops knows (a release spec, a gate report) into a
`RunRecord` (tags, params, metrics, artifacts); pure. `mlflow_store` is the
thin shell that writes and reads them through MLflow's own client, against
`--tracking-uri` (default `sqlite:///<state-dir>/mlflow.db`). Only the
controller and the CLI write runs, never replicas or gate jobs.
"""
