"""ONNX export of stage modules, checking with onnx.checker and verification with onnxruntime.

Two exporters, both verified with the pinned torch: ``dynamo`` (torch.export + onnxscript; the
maintained path, and about half the nodes of the other) and ``torchscript`` (the legacy tracer;
much faster to run, handy for large sweeps). Our attention is explicit matmul/softmax, so both
trace it; timm's fused SDPA attention is never exported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..engines.base import BATCH_AXIS
from .stages import StageSpec, example_feed

EXPORTERS = ("dynamo", "torchscript")
OPSET = 18


class ExportError(RuntimeError):
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


def export_stage(module: nn.Module, stage: StageSpec, path: Path, exporter: str = "dynamo",
                 max_batch: int = 32) -> None:
    """Write ``stage`` to ``path`` with a dynamic batch axis (1..max_batch) and static token axes."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    feed = example_feed(stage, batch=2)
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
                                            dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic)
                program.save(str(path))
            else:
                axes = {name: {0: BATCH_AXIS} for name in input_names + output_names}
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamo=False, opset_version=OPSET, dynamic_axes=axes)
    except Exception as error:  # the exporters raise many types; name the stage and keep the cause
        raise ExportError(f"exporting {stage.name} with the {exporter} exporter failed: {error}") from error
    _stamp_io_shapes(path, stage)


def _stamp_io_shapes(path: Path, stage: StageSpec) -> None:
    """Write the stage's exact I/O shapes into the graph: every dynamic batch dim gets the same
    name ("batch") and token axes become static even where an exporter left them symbolic;
    the full shape inference in check_onnx then proves the graph agrees."""
    model = onnx.load(str(path))
    specs = {t.name: t for t in stage.inputs + stage.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, specs[value.name].shape):
            if want == BATCH_AXIS:
                dim.dim_param = BATCH_AXIS
            else:
                dim.dim_value = int(want)
    onnx.save(model, str(path))


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


def verify_onnx(path: Path, module: nn.Module, stage: StageSpec, batches: tuple[int, ...] = (1, 3),
                threads: int = 1) -> float:
    """Max abs difference between onnxruntime (CPU) and the torch module, over a few batch sizes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        feed = example_feed(stage, batch, seed=batch)
        with torch.no_grad():
            expected = module(*(feed[t.name] for t in stage.inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run([t.name for t in stage.outputs], {k: v.numpy() for k, v in feed.items()})
        for want, have in zip(expected, got):
            if want.shape != have.shape:
                raise ExportError(f"{path}: output shape {have.shape} != reference {tuple(want.shape)}")
            worst = max(worst, float(np.abs(want.numpy() - have).max()))
    return worst
