"""Capacity planning for pdserve clusters: measure a model's step costs on the GPUs at hand
(`profiler.py` → a profile file, `profile.py`), replay workloads on simulated clusters built from
such profiles (`simulator.py`, `nodes.py`, `link.py`), and search cluster shapes for the best
goodput per GPU under an SLO (`plan.py`).

Layering: planner imports `engine` (the real scheduler, and the engine for measuring) and `router`
(the real routing policies); only `deploy` (the CLI) imports planner. It never imports `bench`.
"""
