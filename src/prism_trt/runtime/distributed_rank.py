"""One rank's side of distributed inference: the engine chains of every distributed config (of
every sequence bucket), the request buffers, and the exchange of segment means between blocks
with explicit, timed staging around each all-gather (:class:`StagedAllGather`, the exchange the
drive loop :func:`~prism_trt.core.drive.drive` runs one rank's chain with). :mod:`.distributed`
calls it: rank 0's executor and the workers' loop."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.chain_key import ChainKey, Mode
from ..core.drive import Exchange, PendingMeans, drive_micro_batches, micro_batch_sizes
from ..engines.buckets import Bucket
from ..engines.device import on_compute_stream
from ..engines.manifest import ChainConfig, ManifestError
from ..errors import UsageError
from .chain import EngineChain, load_buckets_here, local_chain
from .group import ClusterError
from .options import DEFAULT_OPTIONS, RuntimeOptions
from .staging import FinalGather, Staging
from .staging_choice import make_staging
from .timing import PhaseTimes, Stopwatch
from .transfers import Crossing, DeviceTransfers


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

    def __init__(self, rank_dir: Path, rank: int, world_size: int, options: RuntimeOptions = DEFAULT_OPTIONS):
        self.buckets, backend = load_buckets_here(rank_dir, options)
        manifest = self.buckets.primary.manifest
        if manifest.rank != rank or manifest.world_size != world_size:
            raise UsageError(f"{rank_dir} holds engines for rank {manifest.rank} of {manifest.world_size}, "
                             f"this process is rank {rank} of {world_size}")
        self.manifest = manifest
        device = options.device
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.spec = manifest.spec
        self.weights = manifest.model.weights_sha256
        self.max_batch = manifest.build_options.max_batch
        dim = self.spec.embed_dim
        # Every rank must stage and send the same element type: part of the signature checked at the join.
        self.exchange_dtype = options.exchange_dtype.resolve(manifest.build_options.precision)
        self.routes: list[Route] = []
        self.local_chains: dict[int | None, EngineChain] = {}
        self.route_of: dict[tuple[int | None, ChainKey], int] = {}  # (bucket length, key) -> the header's index
        self.transfers = DeviceTransfers(device)  # every host <-> device crossing of this rank
        for (length, key), (bucket, config) in self.buckets.chains.items():
            if config.mode is Mode.LOCAL:
                self.local_chains[bucket.length] = local_chain(bucket, backend, options, self.transfers).__enter__()
                continue
            chain = EngineChain(bucket.directory, bucket.manifest, config, backend, False, options,
                                self.transfers).__enter__()
            self.route_of[length, key] = len(self.routes)
            self.routes.append(Route(bucket, config, chain,
                                     make_staging(list(config.plan.counts), rank, dim, device, chain.attended_ranks,
                                                  options.staging, self.exchange_dtype),
                                     FinalGather(list(config.plan.partition.sizes), rank, dim, device,
                                                 self.exchange_dtype)))
        self._requests: dict[tuple[int, int, bool], dict[str, torch.Tensor]] = {}  # (route, batch, narrow)
        self.held: dict[tuple, torch.Tensor] = {}  # micro-batches' tokens kept while another one runs a stage
        # The per-batch header [op, route, batch, barrier, micro-batches, narrow], one buffer for the rank's whole
        # life.
        # Besides saving an allocation, it must outlive the group: torch 2.5's ProcessGroupGloo
        # destructor holds the GIL while joining its worker threads, and a worker thread that drops
        # the last reference to a tensor Python has already let go of needs the GIL to free it, so
        # destroy_process_group() deadlocked when the STOP header was a temporary (3 of 5 runs of the
        # two-rank CLI tests with torch 2.5 hung; 0 of 10 since).
        self.header = torch.zeros(6, dtype=torch.int64)
        self.progress_at = time.monotonic()  # when the last collective completed (stall detection)
        self.batches_run = 0

    @property
    def local_chain(self) -> EngineChain | None:
        """The longest bucket's local chain (rank 0's fallback); None on the workers."""
        return self.local_chains.get(self.buckets.primary.length)

    def signature(self) -> dict:
        """What every rank must agree on before the first collective."""
        return {"weights": self.weights, "world_size": self.world_size, "exchange_dtype": str(self.exchange_dtype),
                "configs": [(r.bucket.length, r.config.name, list(r.config.plan.counts),
                             list(r.config.plan.partition.sizes)) for r in self.routes]}

    def check_consistent(self) -> None:
        signatures: list = [None] * self.world_size
        dist.all_gather_object(signatures, self.signature())
        for rank, other in enumerate(signatures):
            if other != signatures[0]:
                if other.get("exchange_dtype", signatures[0]["exchange_dtype"]) != signatures[0]["exchange_dtype"]:
                    raise ClusterError(f"rank {rank} exchanges features in {other['exchange_dtype']}, rank 0 in "
                                       f"{signatures[0]['exchange_dtype']}; start every rank with the same "
                                       f"--exchange-dtype")
                raise ClusterError(f"rank {rank}'s engines do not match rank 0's (weights, configs or plan "
                                   f"differ): {other} vs {signatures[0]}; build all ranks from one `prism-trt build`")

    def request_buffers(self, route_index: int, batch: int, narrow: bool = False) -> dict[str, torch.Tensor]:
        """The receive buffers of this rank's share of a request to a route (its patches, or its
        positions' ids and mask and the remote segments' sizes), in the dtypes the share crosses the
        wire in (``narrow``: raw uint8 pixels); one set per route, batch size and wire, reused."""
        if (route_index, batch, narrow) not in self._requests:
            route = self.routes[route_index]
            specs = route.bucket.manifest.model.modality.share_inputs(route.config.plan, self.rank, narrow)
            self._requests[route_index, batch, narrow] = {
                t.name: torch.empty(t.concrete(batch), dtype=getattr(torch, t.dtype)) for t in specs}
        return self._requests[route_index, batch, narrow]

    def send_request(self, route_index: int, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """Rank 0: send every other rank its own share of a request (point to point, all at once,
        exact sizes however uneven the partition); returns rank 0's own share and the bytes sent."""
        route = self.routes[route_index]
        modality, plan = route.bucket.manifest.model.modality, route.config.plan
        pending, sent = [], 0
        for rank in range(1, self.world_size):
            for tensor in modality.share(tensors, plan, rank).values():  # in share_inputs order, as received
                pending.append(dist.isend(tensor, dst=rank))
                sent += tensor.numel() * tensor.element_size()
        own = modality.share(tensors, plan, 0)
        for work in pending:
            work.wait()
        self.progress_at = time.monotonic()
        return own, sent

    def receive_request(self, route_index: int, batch: int, narrow: bool) -> tuple[dict[str, torch.Tensor], int]:
        """A worker: its share of a request from rank 0 (:meth:`send_request`) and its bytes."""
        share = self.request_buffers(route_index, batch, narrow)
        for work in [dist.irecv(tensor, src=0) for tensor in share.values()]:
            work.wait()
        self.progress_at = time.monotonic()
        return share, sum(t.numel() * t.element_size() for t in share.values())

    def config_index(self, key: ChainKey, length: int | None) -> int:
        """The route of the chain the longest bucket knows as ``key``, in the bucket of ``length``
        positions (a request's ``bucket_length``; None for a ViT); raises ManifestError (not a
        fallback) when not built."""
        index = self.route_of.get((length, key))
        if index is None:
            bucket = next((b for b in self.buckets if b.length == length), None)
            if bucket is None:
                raise ManifestError(f"no engines for sequence length {length} (built: {list(self.buckets.lengths)})")
            raise ManifestError(f"{bucket.directory}: {self.buckets.chain(key, bucket).name} is built for one rank "
                                f"only, not distributed")
        return index

    def run(self, config_index: int, request: dict[str, torch.Tensor], barrier: bool = False, micro_batches: int = 1
            ) -> tuple[torch.Tensor | None, PhaseTimes]:
        """One forward of config ``config_index`` with the all-gathers over this rank's share of the
        request (:meth:`send_request`, :meth:`receive_request`); logits on rank 0, None elsewhere.
        ``barrier``: a barrier before each all-gather, timed as ``wait`` (every rank must agree).
        ``micro_batches``: the batch cut into this many micro-batches in flight, so one's all-gather
        overlaps another's stages (every rank must agree; a barrier would serialise them, so there
        is none then, and comm is the exchange time compute did not hide, skew included)."""
        route = self.routes[config_index]
        watch = Stopwatch.on(self.device)
        start = time.perf_counter()
        with on_compute_stream(self.device):  # torch's copies and the engines on one stream
            with watch.phase("h2d"):  # raw uint8 pixels cross as bytes, cast to float32 on the device
                request = route.chain.to_engine(request)
            sizes = micro_batch_sizes(next(iter(request.values())).shape[0], micro_batches)
            parts = [dict(zip(request, split)) for split in zip(*(t.split(sizes) for t in request.values()))]
            exchanges = [StagedAllGather(self, route, size, watch, barrier and len(sizes) == 1, micro)
                         for micro, size in enumerate(sizes)]
            logits = drive_micro_batches([route.chain], [[part] for part in parts], exchanges,
                                         route.chain.head_reads_all_positions)
            if logits is not None:
                with watch.phase("compute"):  # the head's answer comes back to the host as part of its compute
                    logits = self.transfers.to_host(logits, Crossing.LOGITS)
        times = watch.resolve()
        return logits, times.close((time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        for chain in [*(r.chain for r in self.routes), *self.local_chains.values()]:
            chain.__exit__(None, None, None)


class StagedAllGather(Exchange):
    """The drive loop's exchange on a distributed rank, for one batch (or micro-batch ``micro``) of
    one route: every rank's means all-gathered between blocks through the route's host staging
    (device -> host, the collective, host -> device), and a per-position head's positions gathered
    to rank 0; each step timed as its phase and the bytes counted. The all-gather is begun
    asynchronously (GLOO runs it on its own threads) and waited for when the next block needs it;
    each micro-batch in flight has its own staging buffers and held tokens."""

    def __init__(self, rank: DistributedRank, route: Route, batch: int, watch: Stopwatch, barrier: bool,
                 micro: int = 0):
        self.rank, self.route, self.batch, self.watch, self.barrier = rank, route, batch, watch, barrier
        self.micro = micro
        # micro-batch 0 keeps the whole batch's key: a batch run whole and its first micro-batch never overlap
        self.key = (route.config.name, batch) + ((micro,) if micro else ())

    def compute(self) -> AbstractContextManager:
        return self.watch.phase("compute")

    def means(self, ranks, sent: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return self.begin_means(ranks, sent).wait()

    def begin_means(self, ranks, sent: list[torch.Tensor | None]) -> PendingMeans:
        (means,) = sent
        staging, watch, batch = self.route.staging, self.watch, self.batch
        buffers = staging.buffers(self.key, batch)
        with watch.phase("d2h"):
            send = staging.to_host(means, buffers)
        if means is not None:
            self.rank.transfers.record(Crossing.EXCHANGE, staging.layout.d2h_bytes(batch, staging.itemsize))
        if self.barrier:
            with watch.phase("wait"):
                dist.barrier()
        with watch.phase("comm"):
            work = dist.all_gather(buffers.gathered, send, async_op=True)
        watch.times.bytes_sent += staging.layout.bytes_sent(batch, staging.itemsize) if means is not None else 0
        watch.times.collectives += 1
        return _AllGatherInFlight(self, work, buffers)

    def hold(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copied into this micro-batch's own buffer (one per shape, reused): nothing allocated in
        the steady state."""
        held = []
        for tokens_p in tokens:
            key = (self.route.config.name, self.micro, tuple(tokens_p.shape), tokens_p.dtype)
            if key not in self.rank.held:
                self.rank.held[key] = torch.empty_like(tokens_p)
            held.append(self.rank.held[key].copy_(tokens_p))
        return held

    def positions(self, tokens: list[torch.Tensor]) -> torch.Tensor | None:
        (own,) = tokens
        gathered = self.route.final_gather.gather(own, self.watch)
        self.rank.transfers.count(Crossing.EXCHANGE, own)
        self.rank.transfers.count(Crossing.EXCHANGE, gathered)
        self.rank.progress_at = time.monotonic()
        return gathered


class _AllGatherInFlight:
    """One begun all-gather of a :class:`StagedAllGather`: waiting for it is timed as comm (the
    part compute did not hide), then the means this rank reads are staged to the device."""

    def __init__(self, exchange: StagedAllGather, work, buffers):
        self.exchange, self.work, self.buffers = exchange, work, buffers

    def wait(self) -> list[torch.Tensor | None]:
        exchange = self.exchange
        watch, staging = exchange.watch, exchange.route.staging
        with watch.phase("comm"):
            self.work.wait()
        exchange.rank.progress_at = time.monotonic()
        with watch.phase("h2d"):
            remote = staging.to_device(self.buffers)
        layout, itemsize = staging.layout, staging.itemsize
        if remote is not None:
            exchange.rank.transfers.record(Crossing.EXCHANGE, layout.h2d_bytes(exchange.batch, itemsize))
        watch.times.bytes_received += layout.bytes_received(exchange.batch, itemsize) if remote is not None else 0
        return [remote]
