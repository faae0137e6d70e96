"""The benchmark harness: `python -m bench` (`make bench`) measures diffops against baselines from the same run.

One module per benchmark family (reconcile, model_load, gate, router, batching,
rollout), each returning `bench.report.Figure`s: a figure, the baseline it is
compared with, their ratio and, where the project set one, a goal. The live
families share one Ray head on the bench's own ports (`bench.ray_head`) and one
controller process on a temporary release repo (`bench.live`).
"""
