"""ONNX export of stage modules and their check with onnx.checker (verification: :mod:`.verify`).

Two exporters: ``torchscript`` (the tracer; ~40x faster to run: about 0.05 s of CPU a stage against
~2 s) and ``dynamo`` (torch.export + onnxscript; about half the nodes before optimisation). Once
onnxruntime has optimised them, both graphs have the same size and speed (a ViT block: 39 nodes
against 42, the same latency), so ``auto`` is torchscript: a first build of the MNIST ViT's 69
stages takes seconds instead of minutes. ``torchscript`` works from the lowest torch we support
(2.5, JetPack 6.1's) up; ``dynamo`` needs a recent torch: torch 2.5's exporter fails on every Linear
over the token axis with a dynamic batch, and torch 2.6 (onnxscript 0.2) writes sequence ops that
onnx's full shape inference rejects. Our attention is explicit matmul/softmax, so both trace it;
timm's fused SDPA attention is never exported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..engines.base import BATCH_AXIS
from ..engines.onnx_format import PREFERRED_OPSET, stamp_ir_version
from ..engines.stage_spec import StageSpec
from ..errors import PrismError
from .stages import example_feed

EXPORTERS = ("dynamo", "torchscript")
#: The first torch release whose dynamo exporter passes our checks (seen: 2.11 on the GPU image, 2.14 in CI).
DYNAMO_MIN_TORCH = (2, 11)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def default_exporter() -> str:
    """torchscript: the fast exporter, which every supported torch has (see the module's docstring)."""
    return "torchscript"


def dynamo_supported() -> bool:
    """Whether this torch's dynamo exporter is verified to export the stages."""
    return torch_version() >= DYNAMO_MIN_TORCH


def resolve_exporter(exporter: str) -> str:
    """``auto`` -> :func:`default_exporter`; an exporter this torch cannot run is refused with the reason."""
    if exporter == "auto":
        return default_exporter()
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be auto or one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and not dynamo_supported():
        raise ExportError(f"the dynamo exporter of torch {torch.__version__} cannot export prism-trt's stages (it "
                          f"needs torch >= {'.'.join(map(str, DYNAMO_MIN_TORCH))}); use --exporter torchscript")
    return exporter


class ExportError(PrismError, RuntimeError):
    """A stage that failed to export, check or verify."""


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter; keep our own output readable."""
    stream = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(stream):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_stage(module: nn.Module, stage: StageSpec, path: Path, exporter: str = "auto",
                 max_batch: int = 32, opset: int = PREFERRED_OPSET) -> None:
    """Write ``stage`` to ``path`` with a dynamic batch axis (1..max_batch) and static token axes, at
    ``opset`` and the lowest IR version that opset allows (see :mod:`prism_trt.engines.onnx_format`)."""
    exporter = resolve_exporter(exporter)
    feed = example_feed(stage, batch=2, module=module)
    args = tuple(feed[t.name] for t in stage.inputs)
    input_names = [t.name for t in stage.inputs]
    output_names = [t.name for t in stage.outputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(), torch.no_grad():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=max_batch)
                dynamic = {name: {0: batch} for name in input_names}
                program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                            dynamo=True, opset_version=opset, dynamic_shapes=dynamic)
                program.save(str(path))
            else:
                axes = {name: {0: BATCH_AXIS} for name in input_names + output_names}
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamo=False, opset_version=opset, dynamic_axes=axes)
    except Exception as error:  # the exporters raise many types; name the stage and keep the cause
        raise ExportError(f"exporting {stage.name} with the {exporter} exporter failed: {error}") from error
    _stamp(path, stage)


def _stamp(path: Path, stage: StageSpec) -> None:
    """Write the stage's exact I/O shapes into the graph: every dynamic batch dim gets the same
    name ("batch") and token axes become static even where an exporter left them symbolic;
    the full shape inference in check_onnx then proves the graph agrees. The exporters stamp the
    newest IR version they know; the file gets the lowest its opset allows."""
    model = onnx.load(str(path))
    specs = {t.name: t for t in stage.inputs + stage.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, specs[value.name].shape):
            if want == BATCH_AXIS:
                dim.dim_param = BATCH_AXIS
            else:
                dim.dim_value = int(want)
    onnx.save(stamp_ir_version(model), str(path))


def check_onnx(path: Path, stage: StageSpec) -> None:
    """onnx.checker with full shape inference, and I/O names/shapes equal to the stage spec."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path}: onnx.checker failed: {error}") from error
    model = onnx.load(str(path), load_external_data=False)
    for expected, values in ((stage.inputs, model.graph.input), (stage.outputs, model.graph.output)):
        found = {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim) for v in values}
        want = {t.name: t.shape for t in expected}
        if found != want:
            raise ExportError(f"{path}: I/O {found} does not match the stage spec {want}")
