"""One rank's chain of engines (embed -> block_00 ... -> head) loaded from its engine directory.

:class:`EngineChain` has the same methods as :class:`prism_trt.core.RankForward`, so the driver
loop that checks the maths (``core.run_ranks``) also runs engines, and the distributed runtime
only swaps the list-based gather for a real collective.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.rank import concat_remote, run_ranks
from ..engines.base import Backend, BuildOptions, Runner
from ..engines.manifest import find_config, load_manifest
from ..engines.registry import get_backend
from ..export.stages import IMAGES, LOGITS, MEANS, NEXT_TOKENS, REMOTE_MEANS, TOKENS, StageSpec


class EngineChain:
    """Runners for one config (local / voltage / prism at a CR) of one rank's engine directory."""

    def __init__(self, rank_dir: Path, manifest: dict, config: dict, backend: Backend, use_monolithic: bool = False):
        self.rank_dir, self.manifest, self.config = Path(rank_dir), manifest, config
        self.rank = 0 if config["mode"] == "local" else manifest["rank"]
        options = BuildOptions(**manifest["build_options"])
        entries = [manifest["monolithic"]] if use_monolithic else config["stages"]
        self.stages: dict[str, tuple[StageSpec, Runner]] = {}
        for entry in entries:
            stage = StageSpec.from_dict(entry)
            runner = backend.load(self.rank_dir / entry["engine"], list(stage.inputs), list(stage.outputs), options)
            self.stages[stage.name] = (stage, runner)
        self.depth = manifest["model"]["spec"]["depth"]

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


def backend_for(manifest: dict, threads: int | None = None) -> Backend:
    built = manifest["backend"]
    return get_backend(built["name"], built.get("provider") or "cpu", threads)


def load_chain(rank_dir: Path, mode: str, cr: float | None = None, threads: int | None = None,
               use_monolithic: bool = False) -> EngineChain:
    """Verify ``rank_dir``'s manifest against this machine's backend/device and load one chain."""
    manifest = load_manifest(rank_dir, verify=False)
    backend = backend_for(manifest, threads)
    manifest = load_manifest(rank_dir, backend=backend.name, device=backend.device())
    return EngineChain(rank_dir, manifest, find_config(manifest, mode, cr), backend, use_monolithic)


@torch.no_grad()
def run_chains_in_process(chains: list[EngineChain], images: torch.Tensor) -> torch.Tensor:
    """All ranks' chains in this process (the exchange is a list): a test and debugging aid."""
    return run_ranks(chains, images)
