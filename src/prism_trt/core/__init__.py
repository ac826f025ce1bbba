"""The Prism core: partition and segment plans, per-rank forward, simulation and accounting."""

from .plan import (
                   PartitionPlan,
                   PlanError,
                   SegmentPlan,
                   make_partition_plan,
                   make_segment_plan,
                   segments_for_cr,
                   voltage_plan,
)
from .rank import RankForward, concat_remote, run_ranks, simulate, simulate_blocks

__all__ = ["PartitionPlan", "PlanError", "SegmentPlan", "make_partition_plan", "make_segment_plan",
           "segments_for_cr", "voltage_plan", "RankForward", "concat_remote", "run_ranks", "simulate", "simulate_blocks"]
