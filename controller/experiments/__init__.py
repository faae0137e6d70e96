"""Experiments: a grid of models x samplers x steps x CFG x seeds over a prompt set, each cell an MLflow run.

The flow of `diffops experiment run FILE`: `schema` + `loader` (the file, validated with file:line errors) ->
`grid` (pure: the cells, each a release config with its version id) -> `draw` (the production pipeline path, one
load per model, every prompt at each cell's seed; in this process, or one Ray job per model through `on_ray` and
`job`) -> `measure` (pure: latency, images/s, cost, CLIP score, distance to the baseline config) -> `record` (a
RunRecord per cell, one parent run) -> `sheet` (the contact sheet) and `table` (the comparison table). `run` is the
shell that walks these steps; `reproduce` draws one recorded cell again and compares it with its images.
"""
