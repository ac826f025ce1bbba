"""One rank's chain of engines (embed -> block_00 ... -> head) loaded from its engine directory.

:class:`EngineChain` has the same methods as :class:`prism_trt.core.RankForward`, so the driver
loop that checks the maths (``core.run_ranks``) also runs engines, and the distributed runtime
only swaps the list-based gather for a real collective.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.rank import concat_remote, run_ranks
from ..engines.base import Backend, Runner
from ..engines.chain_key import ChainKey
from ..engines.manifest import ChainConfig, Manifest, ManifestError
from ..engines.registry import get_backend
from ..engines.stage_spec import IMAGES, LOGITS, MEANS, NEXT_TOKENS, REMOTE_MEANS, TOKENS, StageSpec


class EngineChain:
    """Runners for one config (local / voltage / prism at a CR) of one rank's engine directory."""

    def __init__(self, rank_dir: Path, manifest: Manifest, config: ChainConfig, backend: Backend,
                 use_monolithic: bool = False):
        self.rank_dir, self.manifest, self.config = Path(rank_dir), manifest, config
        self.key = config.key
        self.rank = 0 if config.mode == "local" else manifest.rank
        if use_monolithic and manifest.monolithic is None:
            raise ManifestError(f"{rank_dir} has no monolithic model (only rank 0 of a build has one)")
        entries = [manifest.monolithic] if use_monolithic else config.stages
        self.stages: dict[str, tuple[StageSpec, Runner]] = {}
        for entry in entries:
            runner = backend.load(self.rank_dir / entry.engine, list(entry.spec.inputs), list(entry.spec.outputs),
                                  manifest.build_options)
            self.stages[entry.name] = (entry.spec, runner)
        self.depth = manifest.spec.depth

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

    def _run(self, name: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.stages[name][1].infer(feed)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self._run("embed", {IMAGES: images})
        return out[NEXT_TOKENS], out.get(MEANS)

    def remote_means(self, gathered: list[torch.Tensor]) -> torch.Tensor:
        return concat_remote(gathered, self.rank)

    def block(self, index: int, tokens: torch.Tensor, remote_means: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        feed = {TOKENS: tokens} if remote_means is None else {TOKENS: tokens, REMOTE_MEANS: remote_means}
        out = self._run(f"block_{index:02d}", feed)
        return out[NEXT_TOKENS], out.get(MEANS)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        # Runners reuse their output buffers; what leaves the chain must outlive the next request.
        return self._run("head", {TOKENS: tokens})[LOGITS].clone()

    def monolithic(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("model", {IMAGES: images})[LOGITS].clone()


def backend_for(manifest: Manifest, threads: int | None = None) -> Backend:
    return get_backend(manifest.backend.name, manifest.backend.provider or "cpu", threads)


def load_manifest_here(rank_dir: Path, threads: int | None = None) -> tuple[Manifest, Backend]:
    """``rank_dir``'s manifest, checked against this machine's backend and device (files hashed),
    and the backend that runs it."""
    manifest = Manifest.read(rank_dir)
    backend = backend_for(manifest, threads)
    return manifest.check(rank_dir, backend=backend.name, device=backend.device()), backend


def load_chain(rank_dir: Path, mode: str | ChainKey, cr: float | None = None, threads: int | None = None,
               use_monolithic: bool = False) -> EngineChain:
    """Verify ``rank_dir``'s manifest against this machine and load one chain: a ChainKey, or a
    mode and (for prism) a CR, mapped to the built segment count."""
    manifest, backend = load_manifest_here(rank_dir, threads)
    key = mode if isinstance(mode, ChainKey) else manifest.key_for(mode, cr)
    return EngineChain(rank_dir, manifest, manifest.config(key), backend, use_monolithic)


@torch.no_grad()
def run_chains_in_process(chains: list[EngineChain], images: torch.Tensor) -> torch.Tensor:
    """All ranks' chains in this process (the exchange is a list): a test and debugging aid."""
    return run_ranks(chains, images)
