"""The local executor: rank 0's P=1 engine chain, no process group (mode ``local`` only)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..core.chain_key import ChainKey, Mode
from ..errors import UsageError
from .api import Executor, Health, InferenceResult
from .chain import EngineChain, load_buckets_here, run_chains_in_process
from .options import DEFAULT_OPTIONS, RuntimeOptions
from .request import InferenceRequest
from .timing import PhaseTimes


class LocalExecutor(Executor):
    """Runs every batch on this machine with the local chain of a rank-0 engine directory (one per
    sequence bucket of a text build)."""

    def __init__(self, rank_dir: Path, options: RuntimeOptions = DEFAULT_OPTIONS):
        self.buckets, backend = load_buckets_here(rank_dir, options)
        self.manifest = self.buckets.primary.manifest
        self.spec = self.manifest.spec
        self.model_name = self.spec.name
        self.max_batch = self.manifest.build_options.max_batch
        self.chain_of = {bucket.length: EngineChain(bucket.directory, bucket.manifest,
                                                    bucket.manifest.config(ChainKey.local()), backend).__enter__()
                         for bucket in self.buckets}
        self._lock = threading.Lock()  # one inference at a time through the chain's reused buffers

    def chains(self) -> list[ChainKey]:
        return [ChainKey.local()]

    def infer(self, request: InferenceRequest, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        if key.mode != Mode.LOCAL:
            raise UsageError(f"this executor runs only the local chain, not {key.label}")
        chain = self.chain_of[request.bucket_length]
        with self._lock:
            start = time.perf_counter()
            logits = run_chains_in_process([chain], request)
            total = (time.perf_counter() - start) * 1e3
            compute = sum((r.last_infer_time_s or 0.0) for r in chain.runners) * 1e3
        times = PhaseTimes(compute=compute).close(total)
        return InferenceResult(logits, ChainKey.local(), times, per_rank=[times] if gather_timings else [],
                               sequence_length=request.bucket_length)

    def health(self) -> Health:
        return Health(live=True, ready=True)

    def close(self) -> None:
        for chain in self.chain_of.values():
            chain.__exit__(None, None, None)
