"""Distributed inference over a GLOO group: rank 0 drives, workers follow.

Per batch, rank 0 broadcasts a header ``[op, config, batch, barrier]`` and the request's tensors
(images, or a text model's ids and attention mask; workers follow the header, so only rank 0's
flags matter); every rank embeds its own patches or positions, and after every block the ranks
all-gather their segment means (padded to the largest rank, sliced by the plan) with explicit,
timed staging around the collective. A causal text model's rank p reads only the means of ranks
before it (the others are sent but not read: an all-gather as a first version, correct because
each rank copies only the slots it attends to). Only rank 0 runs the head; a per-position text
head (GPT-2's LM head) first gathers every rank's final hidden states to rank 0. While idle, rank
0 sends heartbeats so that workers (and rank 0 itself) learn of a dead peer within the collective
timeout instead of at the next request.

If a collective fails (a worker died or stopped answering), rank 0 answers the batch with its
local chain, leaves the broken group (so the surviving workers notice at once) and reports
degraded readiness. A GLOO group cannot be repaired in place (its membership is fixed when it is
created), so the group is re-formed instead: surviving workers ask to join again by themselves, a
restarted board does so by running its usual command, and once every worker is waiting rank 0
takes the executor's lock (no batch is in flight then), forms the next group generation and
returns to distributed modes (:mod:`.rendezvous`). A worker that stops answering without dying
(a frozen board) makes readiness degraded while it stalls, and fails the group after the
collective timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..engines.buckets import Bucket
from ..engines.chain_key import ChainKey
from ..engines.manifest import ChainConfig, ManifestError
from ..errors import PrismError, UsageError
from .api import Executor, Health, InferenceResult, Inputs, fit_request, trim_positions
from .chain import EngineChain, load_buckets_here, run_chains_in_process
from .group import ClusterError, GroupConfig
from .rendezvous import Rendezvous
from .staging import FinalGather, Staging, make_staging
from .timing import PhaseTimes, Stopwatch

log = logging.getLogger(__name__)

OP_STOP, OP_INFER, OP_HEARTBEAT, OP_INFER_TIMED = 0, 1, 2, 3
REJOIN_POLL_S = 0.2  # while degraded, how often rank 0 looks for workers asking to join again


@contextmanager
def peer_failures(what: str):
    """GLOO reports a lost peer or a timed-out collective as a bare RuntimeError: say which rank
    lost what, as a ClusterError (PrismErrors pass through unchanged)."""
    try:
        yield
    except PrismError:
        raise
    except RuntimeError as error:
        raise ClusterError(f"{what} ({error}); restart every rank together") from error


@dataclass(frozen=True)
class Route:
    """One distributed chain of one engine set (a text build's sequence bucket, or the only one),
    with its staging buffers and final gather; the header names it by its index."""

    bucket: Bucket
    config: ChainConfig
    chain: EngineChain
    staging: Staging
    final_gather: FinalGather


class DistributedRank:
    """This rank's engine chains for every distributed config (of every sequence bucket), and the
    exchange between blocks."""

    def __init__(self, rank_dir: Path, rank: int, world_size: int, threads: int | None = None,
                 device: str = "cpu"):
        self.buckets, backend = load_buckets_here(rank_dir, threads)
        manifest = self.buckets.primary.manifest
        if manifest.rank != rank or manifest.world_size != world_size:
            raise UsageError(f"{rank_dir} holds engines for rank {manifest.rank} of {manifest.world_size}, "
                             f"this process is rank {rank} of {world_size}")
        self.manifest = manifest
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.spec = manifest.spec
        self.weights = manifest.model.weights_sha256
        self.max_batch = manifest.build_options.max_batch
        dim = self.spec.embed_dim
        self.routes: list[Route] = []
        self.local_chains: dict[int | None, EngineChain] = {}
        for bucket in self.buckets:
            for config in bucket.manifest.configs:
                chain = EngineChain(bucket.directory, bucket.manifest, config, backend).__enter__()
                if config.mode == "local":
                    self.local_chains[bucket.length] = chain
                    continue
                self.routes.append(Route(bucket, config, chain,
                                         make_staging(list(config.counts), rank, dim, device, chain.sources),
                                         FinalGather(list(config.partition), rank, dim, device)))
        self._requests: dict[tuple[int | None, int], dict[str, torch.Tensor]] = {}
        # The per-batch header [op, route, batch, barrier], one buffer for the rank's whole life.
        # Besides saving an allocation, it must outlive the group: torch 2.5's ProcessGroupGloo
        # destructor holds the GIL while joining its worker threads, and a worker thread that drops
        # the last reference to a tensor Python has already let go of needs the GIL to free it, so
        # destroy_process_group() deadlocked when the STOP header was a temporary (3 of 5 runs of the
        # two-rank CLI tests with torch 2.5 hung; 0 of 10 since).
        self.header = torch.zeros(4, dtype=torch.int64)
        self.progress_at = time.monotonic()  # when the last collective completed (stall detection)
        self.batches_run = 0

    @property
    def local_chain(self) -> EngineChain | None:
        """The longest bucket's local chain (rank 0's fallback); None on the workers."""
        return self.local_chains.get(self.buckets.primary.length)

    def signature(self) -> dict:
        """What every rank must agree on before the first collective."""
        return {"weights": self.weights, "world_size": self.world_size,
                "configs": [(r.bucket.length, r.config.name, list(r.config.counts), list(r.config.partition))
                            for r in self.routes]}

    def check_consistent(self) -> None:
        signatures: list = [None] * self.world_size
        dist.all_gather_object(signatures, self.signature())
        for rank, other in enumerate(signatures):
            if other != signatures[0]:
                raise ClusterError(f"rank {rank}'s engines do not match rank 0's (weights, configs or plan "
                                   f"differ): {other} vs {signatures[0]}; build all ranks from one `prism-trt build`")

    def request_buffers(self, route_index: int, batch: int) -> dict[str, torch.Tensor]:
        """The receive buffers for a broadcast request to a route (images, or ids and mask; one set
        per bucket and batch size, reused)."""
        bucket = self.routes[route_index].bucket
        if (bucket.length, batch) not in self._requests:
            self._requests[bucket.length, batch] = {
                t.name: torch.empty(t.concrete(batch), dtype=getattr(torch, t.dtype))
                for t in bucket.manifest.model.request_inputs()}
        return self._requests[bucket.length, batch]

    def config_index(self, key: ChainKey, bucket: Bucket | None = None) -> int:
        """The route of the chain the longest bucket knows as ``key``, in ``bucket`` (default the
        longest); raises ManifestError (not a fallback) when not built."""
        bucket = bucket or self.buckets.primary
        wanted = bucket.manifest.config(self.buckets.translate(key, bucket))
        for index, route in enumerate(self.routes):
            if route.bucket is bucket and route.config is wanted:
                return index
        raise ManifestError(f"{bucket.directory}: {wanted.name} is built for one rank only, not distributed")

    def run(self, config_index: int, request: dict[str, torch.Tensor], barrier: bool = False
            ) -> tuple[torch.Tensor | None, PhaseTimes]:
        """One forward of config ``config_index`` with the all-gathers; logits on rank 0, None elsewhere.
        ``barrier``: a barrier before each all-gather, timed as ``wait`` (every rank must agree)."""
        route = self.routes[config_index]
        config, chain, staging = route.config, route.chain, route.staging
        watch = Stopwatch()
        start = time.perf_counter()
        with watch.phase("h2d"):
            request = {name: tensor.to(self.device, non_blocking=True) for name, tensor in request.items()}
        batch = next(iter(request.values())).shape[0]
        with watch.phase("compute"):
            tokens, means = chain.embed(request)
        for block in range(chain.depth):
            remote = self._exchange(config.name, staging, means, batch, watch, barrier)
            with watch.phase("compute"):
                tokens, means = chain.block(block, tokens, remote, request)
        if chain.head_reads_all_positions:
            tokens = route.final_gather.gather(tokens, watch)
            self.progress_at = time.monotonic()
        logits = None
        if self.rank == 0:
            with watch.phase("compute"):
                logits = chain.head(tokens).cpu()
        return logits, watch.times.close((time.perf_counter() - start) * 1e3)

    def _exchange(self, name: str, staging, means: torch.Tensor | None, batch: int, watch: Stopwatch, barrier: bool
                  ) -> torch.Tensor | None:
        buffers = staging.buffers((name, batch), batch)
        with watch.phase("d2h"):
            send = staging.to_host(means, buffers)
        if barrier:
            with watch.phase("wait"):
                dist.barrier()
        with watch.phase("comm"):
            dist.all_gather(buffers.gathered, send)
        self.progress_at = time.monotonic()
        with watch.phase("h2d"):
            remote = staging.to_device(buffers)
        entry = batch * self.spec.embed_dim * 4
        watch.times.bytes_sent += staging.counts[self.rank] * entry if means is not None else 0
        watch.times.bytes_received += remote.shape[1] * entry if remote is not None else 0
        watch.times.collectives += 1
        return remote

    def close(self) -> None:
        for chain in [*(r.chain for r in self.routes), *self.local_chains.values()]:
            chain.__exit__(None, None, None)


def worker_loop(rank: DistributedRank, stop: threading.Event | None = None) -> int:
    """Follow rank 0 until it says stop; returns the number of batches run in this group. Raises
    RuntimeError on a failed collective (rank 0 left the group, timeout)."""
    header = rank.header
    batches = 0
    while stop is None or not stop.is_set():
        dist.broadcast(header, src=0)
        op, index, batch, barrier = (int(v) for v in header.tolist())
        if op == OP_STOP:
            log.info("rank %d: stop from rank 0 after %d batches", rank.rank, batches)
            return batches
        if op == OP_HEARTBEAT:
            continue
        request = rank.request_buffers(index, batch)
        for tensor in request.values():
            dist.broadcast(tensor, src=0)
        _, times = rank.run(index, request, bool(barrier))
        if op == OP_INFER_TIMED:
            dist.gather_object(times.to_dict(), None, dst=0)
        batches += 1
        rank.batches_run += 1
    return batches


class DistributedExecutor(Executor):
    """Rank 0's :class:`~prism_trt.runtime.api.Executor` over a GLOO group of ``world_size`` ranks.

    heartbeat_s: idle time after which rank 0 broadcasts a heartbeat (default a third of the
    collective timeout); stall_s: how long the workers may leave a collective unanswered before
    readiness says degraded (default a quarter of the timeout, at most 5 s)."""

    def __init__(self, rank_dir: Path, group: GroupConfig, threads: int | None = None, device: str = "cpu",
                 profile_barrier: bool = False, heartbeat_s: float | None = None, stall_s: float | None = None):
        if group.rank != 0:
            raise UsageError("the executor runs on rank 0; other ranks run worker_loop")
        self.group, self.profile_barrier = group, profile_barrier
        self.rank = DistributedRank(rank_dir, 0, group.world_size, threads, device)
        if self.rank.local_chain is None:
            self.rank.close()
            raise UsageError(f"{rank_dir} has no local chain: rank 0 needs it as the fallback")
        self.manifest, self.spec, self.max_batch = self.rank.manifest, self.rank.spec, self.rank.max_batch
        self.buckets = self.rank.buckets
        self.model_name = self.spec.name
        self._lock = threading.Lock()  # collectives must be issued in the same order on every rank
        self._degraded = ""
        self._busy = False  # a distributed batch or heartbeat is in its collectives
        self._closed = threading.Event()
        try:
            self._rendezvous = Rendezvous(group)
        except PrismError:
            self.rank.close()
            raise
        try:
            self._rendezvous.form(fail_on_refusal=True)
            with peer_failures("rank 0: the workers went away while checking their engines"):
                self.rank.check_consistent()
        except PrismError:
            self.rank.close()
            self._rendezvous.close()
            raise
        self._heartbeat_s = heartbeat_s if heartbeat_s is not None else group.timeout_s / 3
        self._stall_s = stall_s if stall_s is not None else min(group.timeout_s / 4, 5.0)
        self._last_collective = time.monotonic()
        self.bandwidth_mbit: float | None = None  # estimated from the collectives actually run
        self._watch = threading.Thread(target=self._watch_loop, name="prism-heartbeat", daemon=True)
        self._watch.start()

    @property
    def generation(self) -> int:
        """The group generation: 0 at start, +1 each time the group was re-formed after a failure."""
        return self._rendezvous.generation

    def chains(self) -> list[ChainKey]:
        primary = self.buckets.primary
        return [ChainKey.local()] + [r.config.key for r in self.rank.routes if r.bucket is primary]

    def health(self) -> Health:
        reason = self._degraded
        if not reason and self._busy:
            waited = time.monotonic() - self.rank.progress_at
            if waited > self._stall_s:
                reason = f"the workers have not answered for {waited:.1f} s (a stalled board?)"
        return Health(live=True, ready=not self._closed.is_set(), degraded=bool(reason), reason=reason)

    @contextmanager
    def _collectives(self):
        """Marks the in-flight collectives of one batch or heartbeat (callers hold self._lock)."""
        self._busy, self.rank.progress_at = True, time.monotonic()
        try:
            yield
        finally:
            self._busy = False
            self._last_collective = time.monotonic()

    def _broadcast_header(self, op: int, index: int = 0, batch: int = 0) -> None:
        header = self.rank.header  # callers hold self._lock: one collective at a time
        header.copy_(torch.tensor([op, index, batch, int(self.profile_barrier)], dtype=torch.int64))
        dist.broadcast(header, src=0)
        self.rank.progress_at = time.monotonic()

    def _degrade(self, why: str) -> None:
        """Serve locally from now on and leave the broken group, so that the surviving workers
        notice at once and ask to join the next one (callers hold self._lock)."""
        self._degraded = why
        log.error("distributed inference failed, serving with rank 0's local chain until every worker is back: %s",
                  why)
        self._rendezvous.leave()

    def _local(self, request: dict[str, torch.Tensor], bucket: Bucket, positions: int | None, fell_back: bool
               ) -> InferenceResult:
        watch = Stopwatch()
        start = time.perf_counter()
        with watch.phase("compute"):
            logits = run_chains_in_process([self.rank.local_chains[bucket.length]], request)
        return InferenceResult(trim_positions(logits, positions, self.manifest.model), ChainKey.local(),
                               watch.times.close((time.perf_counter() - start) * 1e3), fell_back=fell_back,
                               sequence_length=bucket.length)

    def infer(self, inputs: Inputs, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        request, bucket, positions = fit_request(inputs, self.buckets)
        batch = next(iter(request.values())).shape[0]
        if batch > self.max_batch:
            raise UsageError(f"batch {batch} is over the engines' max batch {self.max_batch}")
        with self._lock:
            if key.mode == "local" or self._degraded or self._closed.is_set():
                return self._local(request, bucket, positions, fell_back=key.mode != "local")
            index = self.rank.config_index(key, bucket)
            try:
                with self._collectives():
                    # The request's way to the workers is part of the batch's latency (on a slow
                    # link the largest part): timed as its own phase and added to the total.
                    sent = time.perf_counter()
                    self._broadcast_header(OP_INFER_TIMED if gather_timings else OP_INFER, index, batch)
                    for tensor in request.values():
                        dist.broadcast(tensor.contiguous(), src=0)
                    request_ms = (time.perf_counter() - sent) * 1e3
                    logits, times = self.rank.run(index, request, self.profile_barrier)
                    times.request, times.total = request_ms, times.total + request_ms
                    per_rank = []
                    if gather_timings:
                        gathered: list = [None] * self.group.world_size
                        dist.gather_object(times.to_dict(), gathered, dst=0)
                        per_rank = [PhaseTimes(**t) for t in gathered]
                self._update_bandwidth(times)
                return InferenceResult(trim_positions(logits, positions, self.manifest.model), key, times,
                                       per_rank=per_rank, sequence_length=bucket.length)
            except RuntimeError as error:  # GLOO reports peer loss and timeouts as RuntimeError
                self._degrade(f"{key.label} batch of {batch} failed: {error}")
        return self._local(request, bucket, positions, fell_back=True)

    def _update_bandwidth(self, times: PhaseTimes) -> None:
        """Moving average of the rate the all-gathers achieved (bits moved / time in the collective);
        an underestimate of the link, since comm also holds latency and, without a barrier, skew."""
        if times.comm > 0 and times.bytes_sent + times.bytes_received > 0:
            rate = (times.bytes_sent + times.bytes_received) * 8 / (times.comm * 1e3)
            self.bandwidth_mbit = rate if self.bandwidth_mbit is None else 0.8 * self.bandwidth_mbit + 0.2 * rate

    def _watch_loop(self) -> None:
        """Heartbeats while healthy and idle; while degraded, re-forms the group once every worker
        asks to join again."""
        while not self._closed.wait(REJOIN_POLL_S if self._degraded else self._heartbeat_s / 2):
            if self._degraded:
                self._rejoin_if_all_waiting()
            elif time.monotonic() - self._last_collective >= self._heartbeat_s:
                with self._lock:
                    if self._closed.is_set() or self._degraded:
                        continue
                    try:
                        with self._collectives():
                            self._broadcast_header(OP_HEARTBEAT)
                    except RuntimeError as error:
                        self._degrade(f"heartbeat to the workers failed: {error}")

    def _rejoin_if_all_waiting(self) -> None:
        try:
            if not self._rendezvous.all_waiting():
                return
        except Exception as error:  # the store answers anyone: nothing read from it may stop this thread
            log.warning("cannot read join requests from the rendezvous store: %r", error)
            return
        with self._lock:  # no batch is in flight while the lock is held: the queue waits, nothing is lost
            if self._closed.is_set():
                return
            try:
                generation = self._rendezvous.form()
                with peer_failures(f"rank 0: the re-formed group (generation {self.generation}) failed its check"):
                    self.rank.check_consistent()
            except PrismError as error:
                log.error("re-forming the group failed, still serving locally: %s", error)
                self._rendezvous.leave()
                return
            self._degraded = ""
            self._last_collective = time.monotonic()
        log.warning("every worker is back: group generation %d formed, distributed modes resume", generation)

    def close(self) -> None:
        """Tell the workers to stop, then leave the group and the store (safe to call twice)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if not self._degraded:
                try:
                    self._broadcast_header(OP_STOP)
                except RuntimeError as error:
                    log.warning("could not tell the workers to stop: %s", error)
        self.rank.close()
        self._rendezvous.close()


def run_worker(rank_dir: Path, group: GroupConfig, threads: int | None = None, device: str = "cpu") -> int:
    """A worker board's whole life: load, join, check, follow rank 0 until it says stop, leave.
    When the group breaks (rank 0 left it after another worker died, or a collective timed out)
    the worker asks to join the next one. Returns the number of batches run. A rank 0 that went
    away, a refused token or engines that differ from rank 0's are ClusterErrors naming this rank."""
    rank = DistributedRank(rank_dir, group.rank, group.world_size, threads, device)
    rendezvous = None
    try:
        rendezvous = Rendezvous(group)
        while rendezvous.join() is not None:
            try:
                rank.check_consistent()
                worker_loop(rank)
                return rank.batches_run
            except PrismError:
                raise
            except RuntimeError as error:
                log.warning("rank %d: lost the group (%s); asking rank 0 to join the next one", group.rank, error)
                rendezvous.leave()
        log.info("rank %d: rank 0 stopped while this rank waited to join", group.rank)
        return rank.batches_run
    finally:
        rank.close()
        if rendezvous is not None:
            rendezvous.close()
