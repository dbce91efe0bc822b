"""The benchmark's request sets: the generators live in the product (`planner/datasets.py`, which
`pdserve plan` uses too, and the product may not import bench); re-exported here for the bench."""
from planner.datasets import (SampleRequest, build, multi_turn, random_requests, shared_prefix,  # noqa: F401
                              sharegpt_like)
