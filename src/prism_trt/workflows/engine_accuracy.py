"""`prism-trt accuracy --engines DIR`: the test set through the engines a build wrote, not the torch
simulation of its plans.

Every chain of the build runs twice: **in process** (every rank's engines in this process, the
exchange a list: :func:`~prism_trt.runtime.run_chains_in_process`) and **distributed** (one process
per rank in a real GLOO group on loopback, workers started as `prism-trt run` starts them, rank 0
driving the :class:`~prism_trt.runtime.api.Executor`). Each chain is scored by its top-1 accuracy,
its agreement with the local (P=1) engines (the share of equal top-1 labels) and its logits against
theirs; the distributed logits are compared with the same chain's in-process ones under the
build's precision (``|err| <= atol + rtol*|ref|``), which they must meet: the group changes where a
chain runs, not what it computes. Requests go through :class:`~prism_trt.runtime.InferenceRequest`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.chain_key import ChainKey, Mode
from ..core.precision import Comparison, compare
from ..engines.manifest import Manifest, rank_directory
from ..engines.modality import Vision
from ..errors import UsageError
from ..runtime import GroupConfig, InferenceRequest, RuntimeOptions, load_chain, open_executor, run_chains_in_process
from ..runtime.group import ClusterError, free_port

IN_PROCESS, DISTRIBUTED = "in-process", "gloo"


@dataclass(frozen=True)
class ChainScore:
    """One chain's answers on the test set, run ``execution`` (in-process or over a GLOO group)."""

    key: ChainKey
    execution: str
    ranks: int
    total: int
    correct: int
    agree_with_local: int  # items whose top-1 equals the local (P=1) engines'
    versus_local: Comparison  # its logits against the local engines'
    versus_in_process: Comparison | None  # distributed only: against the same chain run in process

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def agreement(self) -> float:
        return self.agree_with_local / self.total

    def to_dict(self) -> dict:
        return {"chain": self.key.label, "key": self.key.to_dict(), "execution": self.execution, "ranks": self.ranks,
                "total": self.total, "correct": self.correct, "accuracy": self.accuracy,
                "agreement_with_local": self.agreement, "versus_local": self.versus_local.to_dict(),
                "versus_in_process": None if self.versus_in_process is None else self.versus_in_process.to_dict()}


def _ranks_of(key: ChainKey, manifest: Manifest) -> range:
    return range(1) if key.mode is Mode.LOCAL else range(manifest.world_size)


def _in_process_logits(engines: Path, manifest: Manifest, batches: list[tuple[torch.Tensor, torch.Tensor]],
                       options: RuntimeOptions) -> dict[ChainKey, torch.Tensor]:
    """Every chain's logits with all its ranks' engines in this process."""
    logits: dict[ChainKey, list[torch.Tensor]] = {key: [] for key in manifest.keys()}
    with contextlib.ExitStack() as stack:
        chains = {key: [stack.enter_context(load_chain(rank_directory(engines, rank), key, options=options))
                        for rank in _ranks_of(key, manifest)] for key in manifest.keys()}
        for images, _ in batches:
            request = InferenceRequest.of(manifest.model, images)
            for key, ranks in chains.items():
                logits[key].append(run_chains_in_process(ranks, request).float())
    return {key: torch.cat(parts) for key, parts in logits.items()}


@contextlib.contextmanager
def _workers(engines: Path, world_size: int, port: int, threads: int, timeout_s: float) -> Iterator[None]:
    """Ranks 1..P-1 as `prism-trt run` workers on loopback; on leaving, each must have exited 0."""
    argv = [sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--world-size", str(world_size),
            "--master-port", str(port), "--threads", str(threads), "--timeout", str(timeout_s), "--batch", "1", "-q"]
    workers = [subprocess.Popen([*argv, "--rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for rank in range(1, world_size)]
    try:
        yield
    finally:
        failed = []
        for rank, worker in enumerate(workers, start=1):
            try:
                output, _ = worker.communicate(timeout=timeout_s + 30)
            except subprocess.TimeoutExpired:
                worker.kill()
                output, _ = worker.communicate()
            if worker.returncode != 0:
                failed.append(f"rank {rank} exited {worker.returncode}: {output.strip()[-500:]}")
        if failed and sys.exc_info()[0] is None:
            raise ClusterError("a worker of the distributed accuracy run failed: " + "; ".join(failed))


def _distributed_logits(engines: Path, manifest: Manifest, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        options: RuntimeOptions, timeout_s: float) -> dict[ChainKey, torch.Tensor]:
    """Every exchanging chain's logits with one process per rank in a GLOO group on loopback."""
    port = free_port()
    group = GroupConfig(0, manifest.world_size, "127.0.0.1", port, timeout_s)
    with _workers(engines, manifest.world_size, port, options.threads or 1, timeout_s):
        executor = open_executor(engines, group, options)
        try:
            keys = [key for key in executor.chains() if key.mode is not Mode.LOCAL]
            logits: dict[ChainKey, list[torch.Tensor]] = {key: [] for key in keys}
            for images, _ in batches:
                request = executor.request(images)
                for key in keys:
                    result = executor.infer(request, key)
                    if result.fell_back:
                        raise ClusterError(f"{key.label} fell back to the local chain: the group broke")
                    logits[key].append(result.logits.float())
        finally:
            executor.close()
    return {key: torch.cat(parts) for key, parts in logits.items()}


def _score(key: ChainKey, execution: str, ranks: int, logits: torch.Tensor, labels: torch.Tensor,
           local: torch.Tensor, precision: str, in_process: torch.Tensor | None = None) -> ChainScore:
    predicted = logits.argmax(-1)
    return ChainScore(key, execution, ranks, len(labels), int((predicted == labels).sum()),
                      int((predicted == local.argmax(-1)).sum()), compare(logits, local, precision, key.label),
                      None if in_process is None else compare(logits, in_process, precision, key.label))


def evaluate_engines(engines: Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], distributed: bool = True,
                     threads: int = 1, timeout_s: float = 120.0) -> list[ChainScore]:
    """Score every chain of the build in ``engines`` on ``batches`` of (normalised images, labels):
    in process, and (``distributed``, for a build of P >= 2) over a GLOO group of P processes."""
    manifest = Manifest.read(rank_directory(engines, 0))
    if manifest.model.kind != Vision.kind:
        raise UsageError("accuracy --engines scores image classifiers (a ViT build); for a text model use "
                         "`prism-trt accuracy --model NAME`")
    batches = list(batches)
    for images, _ in batches:
        if len(images) > manifest.build_options.max_batch:
            raise UsageError(f"--batch-size {len(images)} is over the engines' max batch "
                             f"{manifest.build_options.max_batch}")
    labels = torch.cat([labels for _, labels in batches])
    options = RuntimeOptions(threads=threads)
    precision = manifest.build_options.precision
    in_process = _in_process_logits(engines, manifest, batches, options)
    local = in_process[ChainKey.local()]
    scores = [_score(key, IN_PROCESS, len(_ranks_of(key, manifest)), logits, labels, local, precision)
              for key, logits in in_process.items()]
    if distributed and manifest.world_size > 1:
        for key, logits in _distributed_logits(engines, manifest, batches, options, timeout_s).items():
            scores.append(_score(key, DISTRIBUTED, manifest.world_size, logits, labels, local, precision,
                                 in_process[key]))
    return scores
