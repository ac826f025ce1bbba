"""One rank's chain of engines (embed -> block_00 ... -> head) loaded from its engine directory.

:class:`EngineChain` mirrors :class:`prism_trt.core.RankForward` (and the text models'
``TextRankForward``) with the rank's share of the request passed along as named tensors: each
stage is fed the share's tensors it declares (its patches; or its positions' ids and attention
mask and the remote segments' sizes) besides its tokens and remote means.
:func:`run_chains_in_process` drives chains with the drive loop (:func:`~prism_trt.core.drive.drive`)
and a list for the all-gather; the distributed runtime drives one chain with a staged collective
instead.

A chain runs on one device (``RuntimeOptions.device``): every runner writes its outputs there, so
activations stay on the device from the embedding to the logits; the request reaches it once (raw
uint8 pixels as bytes, cast to float32 there), and the logits leave it once, through the chain's
:class:`~.transfers.DeviceTransfers`. On a GPU the whole forward is enqueued on the device's
compute stream, shared by torch and the engines. :func:`run_local` is rank 0's single-board
answer: the monolithic engine where the build made one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.chain_key import ChainKey, Mode
from ..core.drive import Exchange, drive
from ..core.plan import attended_ranks
from ..engines.base import Backend, Runner
from ..engines.buckets import Bucket, BucketSet
from ..engines.device import on_compute_stream, resolve_device
from ..engines.manifest import ChainConfig, Manifest, ManifestError
from ..engines.registry import get_backend
from ..engines.stage_spec import LOGITS, MEANS, NEXT_TOKENS, REMOTE_MEANS, TOKENS, StageSpec
from .options import DEFAULT_OPTIONS, RuntimeOptions
from .request import InferenceRequest
from .transfers import Crossing, DeviceTransfers


class EngineChain:
    """Runners for one config (local / voltage / prism at a CR) of one rank's engine directory."""

    def __init__(self, rank_dir: Path, manifest: Manifest, config: ChainConfig, backend: Backend,
                 use_monolithic: bool = False, options: RuntimeOptions = DEFAULT_OPTIONS,
                 transfers: DeviceTransfers | None = None):
        """``options``: the device the chain runs on and whether its engines use CUDA graphs;
        ``transfers``: the rank's host <-> device boundary (the chain's own when not given)."""
        self.rank_dir, self.manifest, self.config = Path(rank_dir), manifest, config
        self.key = config.key
        self.rank = 0 if config.mode == Mode.LOCAL else manifest.rank
        if use_monolithic and manifest.monolithic is None:
            raise ManifestError(f"{rank_dir} has no monolithic model (only rank 0 of a build has one)")
        self.device = resolve_device(options.device)
        backend.check_device(self.device)
        self.transfers = transfers if transfers is not None else DeviceTransfers(self.device)
        self.is_monolithic = use_monolithic
        self._engine_inputs: dict[tuple, torch.Tensor] = {}  # request tensors cast on the device, by shape
        entries = [manifest.monolithic] if use_monolithic else config.stages
        self.stages: dict[str, tuple[StageSpec, Runner]] = {}
        for entry in entries:
            runner = backend.load(self.rank_dir / entry.engine, list(entry.spec.inputs), list(entry.spec.outputs),
                                  manifest.build_options, self.device, options.cuda_graphs)
            self.stages[entry.name] = (entry.spec, runner)
        #: what each input name is fed to the stages as (a request's raw uint8 pixels are cast to it on the device)
        self._input_dtypes = {t.name: getattr(torch, t.dtype) for spec, _ in self.stages.values() for t in spec.inputs}
        self.depth = manifest.spec.depth
        #: ranks whose means this rank reads, in order (a causal text model: the earlier ones only)
        self.attended_ranks = attended_ranks(config.ranks, self.rank, manifest.model.causal)
        self.head_reads_all_positions = manifest.model.head_reads_all_positions

    def __enter__(self) -> EngineChain:
        for _, runner in self.stages.values():
            runner.activate()
        return self

    def __exit__(self, *exc) -> None:
        for _, runner in self.stages.values():
            runner.deactivate()

    @property
    def runners(self) -> list[Runner]:
        return [runner for _, runner in self.stages.values()]

    def _run(self, name: str, request: dict[str, torch.Tensor], own: dict[str, torch.Tensor | None] | None = None
             ) -> dict[str, torch.Tensor]:
        """Stage ``name`` fed the inputs it declares: ``own`` tensors (tokens, remote means) or the request's."""
        spec, runner = self.stages[name]
        own = own or {}
        feed = {t.name: own[t.name] if t.name in own else request[t.name] for t in spec.inputs}
        # Whatever reaches a stage from off the device crosses here, counted as a stray crossing
        # (the request and the exchanged means arrive on the device already).
        feed = {name: tensor if tensor.device == runner.device else self.transfers.to_device(tensor, Crossing.OTHER)
                for name, tensor in feed.items()}
        return runner.infer(feed)

    def embed(self, request: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self._run("embed", request)
        return out[NEXT_TOKENS], out.get(MEANS)

    def block(self, index: int, tokens: torch.Tensor, remote_means: torch.Tensor | None,
              request: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self._run(f"block_{index:02d}", request, {TOKENS: tokens, REMOTE_MEANS: remote_means})
        return out[NEXT_TOKENS], out.get(MEANS)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        # Runners reuse their output buffers; what leaves the chain must outlive the next request.
        return self._run("head", {}, {TOKENS: tokens})[LOGITS].clone()

    def monolithic(self, request: InferenceRequest) -> torch.Tensor:
        """The monolithic engine's logits, on the device (a chain loaded with ``use_monolithic``)."""
        with on_compute_stream(self.device):
            inputs = self.to_engine(self.manifest.model.modality.model_inputs(request.tensors))
            return self._run("model", inputs)[LOGITS].clone()

    def to_engine(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A request's tensors (this rank's share, or the whole request for the monolithic engine)
        on the chain's device in the dtypes its stages declare: raw uint8 pixels cross to the device
        as bytes and become float32 there, in a buffer reused per shape."""
        out = {}
        for name, tensor in self.transfers.request_to_device(tensors).items():
            dtype = self._input_dtypes.get(name, tensor.dtype)
            if tensor.dtype != dtype:
                key = (name, tuple(tensor.shape), dtype)
                if key not in self._engine_inputs:
                    self._engine_inputs[key] = torch.empty(tensor.shape, dtype=dtype, device=self.device)
                tensor = self._engine_inputs[key].copy_(tensor)
            out[name] = tensor
        return out


def backend_for(manifest: Manifest, options: RuntimeOptions = DEFAULT_OPTIONS) -> Backend:
    return get_backend(manifest.backend.name, manifest.backend.provider or "cpu", options.threads)


def load_manifest_here(rank_dir: Path, options: RuntimeOptions = DEFAULT_OPTIONS) -> tuple[Manifest, Backend]:
    """``rank_dir``'s manifest, checked against this machine's backend and device (files hashed),
    and the backend that runs it."""
    manifest = Manifest.read(rank_dir)
    backend = backend_for(manifest, options)
    return manifest.check(rank_dir, backend=backend.name, device=backend.device()), backend


def load_buckets_here(rank_dir: Path, options: RuntimeOptions = DEFAULT_OPTIONS) -> tuple[BucketSet, Backend]:
    """``rank_dir``'s engine sets (one, or a text build's sequence buckets), each checked against
    this machine's backend and device with its files hashed, and the backend that runs them."""
    manifest, backend = load_manifest_here(rank_dir, options)
    return BucketSet.read(rank_dir, manifest, backend.name, backend.device()), backend


def load_chain(rank_dir: Path, mode: str | ChainKey, cr: float | None = None,
               options: RuntimeOptions = DEFAULT_OPTIONS, use_monolithic: bool = False) -> EngineChain:
    """Verify ``rank_dir``'s manifest against this machine and load one chain: a ChainKey, or a
    mode and (for prism) a CR, mapped to the built segment count."""
    manifest, backend = load_manifest_here(rank_dir, options)
    key = mode if isinstance(mode, ChainKey) else manifest.key_for(mode, cr)
    return EngineChain(rank_dir, manifest, manifest.config(key), backend, use_monolithic, options)


def local_chain(bucket: Bucket, backend: Backend, options: RuntimeOptions = DEFAULT_OPTIONS,
                transfers: DeviceTransfers | None = None) -> EngineChain:
    """Rank 0's single-board chain of one engine set: the monolithic engine where the build made
    one (one session instead of one per stage), else the local chain of stages."""
    manifest = bucket.manifest
    return EngineChain(bucket.directory, manifest, manifest.config(ChainKey.local()), backend,
                       manifest.monolithic is not None, options, transfers)


@torch.no_grad()
def run_local(chain: EngineChain, inputs: InferenceRequest) -> torch.Tensor:
    """Rank 0's single-board answer, in host memory: the monolithic engine, or the P=1 chain driven
    alone; the request crosses to the device once and the logits back once."""
    with on_compute_stream(chain.device):
        logits = chain.monolithic(inputs) if chain.is_monolithic else run_chains_in_process([chain], inputs)
        return chain.transfers.to_host(logits, Crossing.LOGITS)


@torch.no_grad()
def run_chains_in_process(chains: list[EngineChain], inputs: InferenceRequest) -> torch.Tensor:
    """All ranks' chains in this process (the exchange is a list), in rank order, each reading its
    rank's share of the request, the logits left on the chains' device: the local chain's loop, and
    a test and debugging aid (``InferenceRequest.of(manifest.model, images)``)."""
    modality = chains[0].manifest.model.modality
    with on_compute_stream(chains[0].device):
        requests = [chain.to_engine(modality.share(inputs.tensors, chain.config.plan, chain.rank)) for chain in chains]
        return drive(chains, requests, Exchange(), chains[0].head_reads_all_positions)
