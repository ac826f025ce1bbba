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
from .text_rank import RankMasks, TextRankForward, simulate_text, text_partition

__all__ = ["PartitionPlan", "PlanError", "SegmentPlan", "make_partition_plan", "make_segment_plan",
           "segments_for_cr", "voltage_plan", "RankForward", "concat_remote", "run_ranks", "simulate", "simulate_blocks",
           "RankMasks", "TextRankForward", "simulate_text", "text_partition"]
