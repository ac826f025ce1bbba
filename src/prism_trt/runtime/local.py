"""The local executor: rank 0's single-board engines, no process group (mode ``local`` only)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..core.chain_key import ChainKey, Mode
from ..errors import UsageError
from .api import Executor, Health, InferenceResult
from .chain import load_buckets_here, local_chain, run_local
from .options import DEFAULT_OPTIONS, RuntimeOptions
from .request import InferenceRequest
from .timing import Stopwatch
from .transfers import DeviceTransfers


class LocalExecutor(Executor):
    """Runs every batch on this machine with rank 0's single-board engines of a rank-0 engine
    directory (one set per sequence bucket of a text build): the monolithic engine where the build
    made one, else the local chain (:func:`~.chain.local_chain`)."""

    def __init__(self, rank_dir: Path, options: RuntimeOptions = DEFAULT_OPTIONS):
        self.buckets, backend = load_buckets_here(rank_dir, options)
        self.manifest = self.buckets.primary.manifest
        self.spec = self.manifest.spec
        self.model_name = self.spec.name
        self.max_batch = self.manifest.build_options.max_batch
        self.device = options.device
        self.transfers = DeviceTransfers(options.device)
        self.chain_of = {bucket.length: local_chain(bucket, backend, options, self.transfers).__enter__()
                         for bucket in self.buckets}
        self._lock = threading.Lock()  # one inference at a time through the chain's reused buffers

    def chains(self) -> list[ChainKey]:
        return [ChainKey.local()]

    def infer(self, request: InferenceRequest, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        if key.mode != Mode.LOCAL:
            raise UsageError(f"this executor runs only the local chain, not {key.label}")
        chain = self.chain_of[request.bucket_length]
        with self._lock:
            watch = Stopwatch.on(self.device)
            start = time.perf_counter()
            with watch.phase("compute"):
                logits = run_local(chain, request)
            times = watch.resolve().close((time.perf_counter() - start) * 1e3)
        return InferenceResult(logits, ChainKey.local(), times, per_rank=[times] if gather_timings else [],
                               sequence_length=request.bucket_length)

    def health(self) -> Health:
        return Health(live=True, ready=True)

    def close(self) -> None:
        for chain in self.chain_of.values():
            chain.__exit__(None, None, None)
