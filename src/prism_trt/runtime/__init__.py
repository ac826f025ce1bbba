"""Per-rank engine chains, the local and distributed executors built on them, and
:func:`open_executor`, the one way `run` and `serve` start rank 0."""

from __future__ import annotations

from pathlib import Path

from ..engines.manifest import rank_directory
from ..errors import UsageError
from .api import Executor, FixedSelector, Health, InferenceResult, Selector
from .chain import EngineChain, load_chain, run_chains_in_process
from .group import ClusterError, GroupConfig
from .options import DEFAULT_OPTIONS, RuntimeOptions
from .request import InferenceRequest


def open_executor(engines: Path, group: GroupConfig, options: RuntimeOptions = DEFAULT_OPTIONS) -> Executor:
    """Rank 0's executor for a build directory (or one rank's engine directory): the local chain
    on a single board, else the distributed executor, which joins the group and checks that every
    rank holds engines of the same build. Workers call :func:`~.distributed.run_worker` instead."""
    if group.rank != 0:
        raise UsageError(f"open_executor runs on rank 0; rank {group.rank} runs run_worker")
    rank_dir = rank_directory(engines, group.rank)
    if group.world_size == 1:
        from .local import LocalExecutor

        return LocalExecutor(rank_dir, options)
    from .distributed import DistributedExecutor

    return DistributedExecutor(rank_dir, group, options)


__all__ = ["ClusterError", "EngineChain", "Executor", "FixedSelector", "GroupConfig", "Health", "InferenceRequest",
           "InferenceResult", "RuntimeOptions", "Selector", "load_chain", "open_executor", "run_chains_in_process"]
