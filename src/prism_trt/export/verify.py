"""Verification of exported stages and built engines against the torch reference, on the target.

Every stage is run on random inputs of a few batch sizes, and each output is compared with the
torch module's (CPU, fp32) under the tolerance of the precision the engine computes in
(:mod:`prism_trt.core.precision`). Two checks, each with its own report
(:class:`~prism_trt.engines.verification.VerificationReport`, kept in the manifest):

* **engine** — the built engine, loaded by its backend and run where it will run (the CUDA EP when
  building for CUDA, TensorRT on the GPU), at the build's precision;
* **export** — the ONNX file on onnxruntime's CPU EP in fp32. It is run only when the engine check
  does not already cover it (a reduced-precision or GPU engine), so that a failure says whether
  the export or the precision is at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.precision import Comparison, ToleranceError, compare_outputs, worst
from ..engines.base import Backend, BuildOptions
from ..engines.stage_spec import StageSpec
from ..engines.verification import VerificationReport
from ..errors import PrismError
from .stages import example_feed

DEFAULT_BATCHES = (1, 3)


class VerificationError(PrismError, RuntimeError):
    """A stage or engine whose outputs differ from the reference beyond the precision's tolerance."""


@dataclass(frozen=True)
class Case:
    """One verification input: a feed and the reference's outputs for it."""

    batch: int
    feed: dict[str, torch.Tensor]
    expected: dict[str, np.ndarray]


def reference_cases(module: nn.Module, stage: StageSpec, batches: Sequence[int] = DEFAULT_BATCHES) -> list[Case]:
    """Deterministic random feeds (one seed per batch size) and the torch module's outputs."""
    cases = []
    for batch in batches:
        feed = example_feed(stage, batch, seed=batch, module=module)
        with torch.no_grad():
            outputs = module(*(feed[t.name] for t in stage.inputs))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        cases.append(Case(batch, feed, {t.name: o.numpy() for t, o in zip(stage.outputs, outputs)}))
    return cases


def compare_cases(run: Callable[[dict[str, torch.Tensor]], Mapping[str, np.ndarray]], cases: Sequence[Case],
                  precision: str, prefix: str) -> list[Comparison]:
    """Run every case; per output, the comparison that used the most of its tolerance."""
    by_output: dict[str, list[Comparison]] = {}
    for case in cases:
        try:
            results = compare_outputs(run(case.feed), case.expected, precision, prefix)
        except ToleranceError as error:  # missing outputs or wrong shapes: not a numerical question
            raise VerificationError(f"batch {case.batch}: {error}") from None
        for result in results:
            by_output.setdefault(result.name, []).append(result)
    return [worst(results) for results in by_output.values()]


def run_onnx_cpu(path: Path, threads: int = 1) -> Callable[[dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """An onnxruntime CPU session over ``path`` as a feed -> outputs function."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v.numpy() for k, v in feed.items()})))

    return run


def verify_onnx(path: Path, module: nn.Module, stage: StageSpec, batches: Sequence[int] = DEFAULT_BATCHES,
                threads: int = 1, cases: Sequence[Case] | None = None) -> VerificationReport:
    """The ONNX file on onnxruntime's CPU EP against the module, at fp32."""
    cases = cases if cases is not None else reference_cases(module, stage, batches)
    return VerificationReport.of(compare_cases(run_onnx_cpu(path, threads), cases, "fp32", f"{path.name}:"))


def verify_engine(backend: Backend, engine_path: Path, stage: StageSpec, options: BuildOptions,
                  cases: Sequence[Case]) -> VerificationReport:
    """The engine, run by its backend on its device, against the reference at the build's precision."""
    on_device = backend.runs_on_cuda and torch.cuda.is_available()
    runner = backend.load(engine_path, list(stage.inputs), list(stage.outputs), options)
    with runner:
        def run(feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
            feed = {name: tensor.cuda() for name, tensor in feed.items()} if on_device else feed
            return {name: tensor.detach().cpu().numpy() for name, tensor in runner.infer(feed).items()}

        return VerificationReport.of(compare_cases(run, cases, options.precision, f"{engine_path.name}:"))


def verification_batches(options: BuildOptions) -> tuple[int, ...]:
    """Batch 1 and 3 where the engine's profile allows them, else its ends."""
    wanted = [b for b in DEFAULT_BATCHES if options.min_batch <= b <= options.max_batch]
    return tuple(sorted(set(wanted or [options.min_batch, options.max_batch])))


def require_passed(report: VerificationReport, what: str, hint: str) -> None:
    failed = [c for c in report.outputs if not c.passed]
    if failed:
        raise VerificationError(f"{what} differs from the reference beyond the tolerance:\n  "
                                + "\n  ".join(c.describe() for c in failed) + f"\n{hint}")
