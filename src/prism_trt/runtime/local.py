"""The local executor: rank 0's P=1 engine chain, no process group (mode ``local`` only)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..engines.manifest import load_manifest
from ..model.spec import ViTSpec
from .api import Choice, Health, InferenceResult
from .chain import load_chain, run_chains_in_process
from .timing import PhaseTimes


class LocalExecutor:
    """Runs every batch on this machine with the local chain of a rank-0 engine directory."""

    def __init__(self, rank_dir: Path, threads: int | None = None):
        manifest = load_manifest(rank_dir)
        self.spec = ViTSpec.from_dict(manifest["model"]["spec"])
        self.model_name = self.spec.name
        self.max_batch = manifest["build_options"]["max_batch"]
        self.chain = load_chain(rank_dir, "local", threads=threads).__enter__()
        self._lock = threading.Lock()  # one inference at a time through the chain's reused buffers

    def choices(self) -> list[Choice]:
        return [Choice("local")]

    def infer(self, images: torch.Tensor, choice: Choice) -> InferenceResult:
        if choice.mode != "local":
            raise ValueError(f"this executor runs only local mode, not {choice.label}")
        with self._lock:
            start = time.perf_counter()
            logits = run_chains_in_process([self.chain], images)
            total = (time.perf_counter() - start) * 1e3
            compute = sum((r.last_infer_time_s or 0.0) for r in self.chain.runners) * 1e3
        return InferenceResult(logits, Choice("local"), PhaseTimes(compute=compute).close(total))

    def health(self) -> Health:
        return Health(live=True, ready=True)

    def close(self) -> None:
        self.chain.__exit__(None, None, None)
