"""Per-rank engine chains; the distributed runtime builds on them."""

from .chain import EngineChain, load_chain, run_chains_in_process

__all__ = ["EngineChain", "load_chain", "run_chains_in_process"]
