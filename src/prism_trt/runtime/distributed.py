"""Distributed inference over a GLOO group: rank 0 drives, workers follow.

Per batch, rank 0 broadcasts a header ``[op, config, batch, barrier, micro-batches, narrow]`` and
sends each worker only its share of the request, point to point (its patches' pixels, one byte a
value when the request came as raw UINT8 pixels (``narrow``); or its positions' ids and mask and
the sizes of the remote segments it attends to; workers follow the header, so only rank 0's flags
matter); every rank embeds its own patches or positions, and after every block the ranks
all-gather their segment means (padded to the largest rank, sliced by the plan) with explicit,
timed staging around the collective. A causal text model's rank p reads only the means of ranks
before it (the others are sent but not read: an all-gather as a first version, correct because
each rank copies only the slots it attends to). Only rank 0 runs the head; a per-position text
head (GPT-2's LM head) first gathers every rank's final hidden states to rank 0. While idle, rank
0 sends heartbeats so that workers (and rank 0 itself) learn of a dead peer within the collective
timeout instead of at the next request; with ``link_probe_s`` set, those heartbeats carry a timed
payload now and then, so the link's rate stays known while nothing distributed runs
(:mod:`.link_probe`).

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
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.chain_key import ChainKey, Mode
from ..errors import PrismError, UsageError
from .api import Executor, Health, InferenceResult
from .chain import run_local
from .distributed_rank import DistributedRank
from .group import ClusterError, GroupConfig
from .link_probe import LinkProbe, answer_probe, payload_bytes, probe_link
from .options import DEFAULT_OPTIONS, RuntimeOptions, micro_batches_for
from .rendezvous import Rendezvous
from .request import InferenceRequest
from .timing import PhaseTimes, Stopwatch

log = logging.getLogger(__name__)

OP_STOP, OP_INFER, OP_HEARTBEAT, OP_INFER_TIMED, OP_PROBE = 0, 1, 2, 3, 4
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


def worker_loop(rank: DistributedRank, stop: threading.Event | None = None) -> int:
    """Follow rank 0 until it says stop; returns the number of batches run in this group. Raises
    RuntimeError on a failed collective (rank 0 left the group, timeout)."""
    header = rank.header
    batches = 0
    while stop is None or not stop.is_set():
        dist.broadcast(header, src=0)
        op, index, batch, barrier, micro_batches, narrow = (int(v) for v in header.tolist())
        if op == OP_STOP:
            log.info("rank %d: stop from rank 0 after %d batches", rank.rank, batches)
            return batches
        if op == OP_HEARTBEAT:
            continue
        if op == OP_PROBE:  # the header's batch field holds the payload's size
            answer_probe(batch)
            continue
        request, received = rank.receive_request(index, batch, bool(narrow))
        _, times = rank.run(index, request, bool(barrier), micro_batches)
        times.request_bytes = received
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

    def __init__(self, rank_dir: Path, group: GroupConfig, options: RuntimeOptions = DEFAULT_OPTIONS,
                 heartbeat_s: float | None = None, stall_s: float | None = None):
        if group.rank != 0:
            raise UsageError("the executor runs on rank 0; other ranks run worker_loop")
        self.group, self.profile_barrier = group, options.profile_barrier
        self.micro_batches = options.micro_batches  # None: chosen per batch (micro_batches_for)
        self.rank = DistributedRank(rank_dir, 0, group.world_size, options)
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
            self._rendezvous.form()
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
        self._probe_s = options.link_probe_s
        self.link_probe: LinkProbe | None = None  # the newest reading of the link's probe
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

    def _broadcast_header(self, op: int, index: int = 0, batch: int = 0, micro_batches: int = 1,
                          narrow: bool = False) -> None:
        header = self.rank.header  # callers hold self._lock: one collective at a time
        header.copy_(torch.tensor([op, index, batch, int(self.profile_barrier), micro_batches, int(narrow)],
                                  dtype=torch.int64))
        dist.broadcast(header, src=0)
        self.rank.progress_at = time.monotonic()

    def _degrade(self, why: str) -> None:
        """Serve locally from now on and leave the broken group, so that the surviving workers
        notice at once and ask to join the next one (callers hold self._lock)."""
        self._degraded = why
        log.error("distributed inference failed, serving with rank 0's local chain until every worker is back: %s",
                  why)
        self._rendezvous.leave()

    def _local(self, request: InferenceRequest, fell_back: bool) -> InferenceResult:
        watch = Stopwatch()
        start = time.perf_counter()
        with watch.phase("compute"):
            logits = run_local(self.rank.local_chains[request.bucket_length], request)
        return InferenceResult(logits, ChainKey.local(), watch.times.close((time.perf_counter() - start) * 1e3),
                               fell_back=fell_back, sequence_length=request.bucket_length)

    def infer(self, inputs: InferenceRequest, key: ChainKey, gather_timings: bool = False) -> InferenceResult:
        batch = inputs.batch_size
        if batch > self.max_batch:
            raise UsageError(f"batch {batch} is over the engines' max batch {self.max_batch}")
        request = inputs.tensors
        if key.mode == Mode.LOCAL:  # crosses no link: never waits for a heartbeat or probe stuck on one
            return self._local(inputs, fell_back=False)
        with self._lock:
            if self._degraded or self._closed.is_set():
                return self._local(inputs, fell_back=True)
            index = self.rank.config_index(key, inputs.bucket_length)
            try:
                with self._collectives():
                    # The request's way to the workers is part of the batch's latency (on a slow
                    # link the largest part): timed as its own phase and added to the total.
                    sent = time.perf_counter()
                    micro = micro_batches_for(self.micro_batches, batch, self.profile_barrier)
                    narrow = self.rank.routes[index].bucket.manifest.model.modality.narrow(request)
                    self._broadcast_header(OP_INFER_TIMED if gather_timings else OP_INFER, index, batch, micro,
                                           narrow)
                    own, request_bytes = self.rank.send_request(index, request)
                    request_ms = (time.perf_counter() - sent) * 1e3
                    logits, times = self.rank.run(index, own, self.profile_barrier, micro)
                    times.request, times.total = request_ms, times.total + request_ms
                    times.request_bytes = request_bytes
                    per_rank = []
                    if gather_timings:
                        gathered: list = [None] * self.group.world_size
                        dist.gather_object(times.to_dict(), gathered, dst=0)
                        per_rank = [PhaseTimes(**t) for t in gathered]
                self._update_bandwidth(times)
                return InferenceResult(logits, key, times, per_rank=per_rank,
                                       sequence_length=inputs.bucket_length)
            except RuntimeError as error:  # GLOO reports peer loss and timeouts as RuntimeError
                self._degrade(f"{key.label} batch of {batch} failed: {error}")
        return self._local(inputs, fell_back=True)

    def _update_bandwidth(self, times: PhaseTimes) -> None:
        """Moving average of the rate the all-gathers achieved (bits moved / time in the collective);
        an underestimate of the link, since comm also holds latency and, without a barrier, skew."""
        if times.comm > 0 and times.bytes_sent + times.bytes_received > 0:
            rate = (times.bytes_sent + times.bytes_received) * 8 / (times.comm * 1e3)
            self.bandwidth_mbit = rate if self.bandwidth_mbit is None else 0.8 * self.bandwidth_mbit + 0.2 * rate

    def _watch_loop(self) -> None:
        """Heartbeats while healthy and idle; while degraded, re-forms the group once every worker
        asks to join again."""
        while not self._closed.wait(REJOIN_POLL_S if self._degraded else self._idle_poll_s()):
            if self._degraded:
                self._rejoin_if_all_waiting()
            elif self._probe_due():
                self._probe()
            elif time.monotonic() - self._last_collective >= self._heartbeat_s:
                with self._lock:
                    if self._closed.is_set() or self._degraded:
                        continue
                    try:
                        with self._collectives():
                            self._broadcast_header(OP_HEARTBEAT)
                    except RuntimeError as error:
                        self._degrade(f"heartbeat to the workers failed: {error}")

    def _idle_poll_s(self) -> float:
        return min(self._heartbeat_s, self._probe_s or self._heartbeat_s) / 2

    def _probe_due(self) -> bool:
        """A probe replaces the heartbeat once no collective crossed the link for ``link_probe_s``:
        distributed batches measure the link themselves."""
        return self._probe_s > 0 and time.monotonic() - self._last_collective >= self._probe_s

    def _probe(self) -> None:
        """Time the link (:func:`~.link_probe.probe_link`); its reading becomes ``bandwidth_mbit``."""
        with self._lock:  # a batch may have crossed the link while this thread waited for the lock
            if self._closed.is_set() or self._degraded or not self._probe_due():
                return
            last = self.link_probe
            size = payload_bytes(last)
            try:
                with self._collectives():
                    self._broadcast_header(OP_PROBE, 0, size)
                    reading = probe_link(size, (last.count if last else 0) + 1)
            except RuntimeError as error:
                self._degrade(f"link probe to the workers failed: {error}")
                return
            if reading is not None:
                self.link_probe, self.bandwidth_mbit = reading, reading.mbit

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


def run_worker(rank_dir: Path, group: GroupConfig, options: RuntimeOptions = DEFAULT_OPTIONS) -> int:
    """A worker board's whole life: load, join, check, follow rank 0 until it says stop, leave.
    When the group breaks (rank 0 left it after another worker died, or a collective timed out)
    the worker asks to join the next one. Returns the number of batches run. A rank 0 that went
    away, a refused token or engines that differ from rank 0's are ClusterErrors naming this rank."""
    rank = DistributedRank(rank_dir, group.rank, group.world_size, options)
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
