"""The Prism core: partition and segment plans, per-rank forward, simulation and accounting."""

from .chain_key import ChainKey, Mode
from .drive import Exchange, NoExchange, drive, drive_blocks, remote_means
from .plan import (
    PartitionPlan,
    PlanError,
    SegmentPlan,
    cr_for_segments,
    make_partition_plan,
    make_segment_plan,
    segments_for_cr,
    voltage_plan,
)
from .rank import RankForward, simulate, simulate_blocks
from .text_rank import RankBatch, RankMasks, TextRankForward, simulate_text, text_partition

__all__ = ["ChainKey", "Mode", "PartitionPlan", "PlanError", "SegmentPlan", "cr_for_segments", "make_partition_plan",
           "make_segment_plan", "segments_for_cr", "voltage_plan", "Exchange", "NoExchange", "drive", "drive_blocks",
           "remote_means", "RankForward", "simulate", "simulate_blocks", "RankBatch", "RankMasks", "TextRankForward",
           "simulate_text", "text_partition"]
