"""The native TensorRT backend: ONNX -> serialized engine (``.plan``) -> :class:`TensorRTRunner`.

Precision (``BuildOptions.precision``): "fp32" clears the TF32 builder flag (TensorRT sets it by
default), "tf32" keeps it, "fp16" on TensorRT 10 sets the FP16 builder flag on the fp32 ONNX;
TensorRT 11 removed that flag and types every network strongly, so an fp16 build parses an
fp16-cast copy of the ONNX (float32 inputs and outputs kept, see :mod:`..fp16`). Either way the
engine's I/O stays float32 and the batch axis is dynamic over ``BuildOptions.min_batch..max_batch``.

The timing cache file, when given, is shared by every stage of a build: it is loaded if it exists
and saved back after each engine, so later stages (and rebuilds) skip tactic timing already done.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...errors import UsageError
from ..base import BATCH_AXIS, Backend, BackendUnavailable, BuildOptions, EngineBuildError, TensorSpec
from ..fp16 import cast_onnx_to_fp16
from .runner import (
    INSTALL_HINT,
    TensorRTRunner,
    cuda_device,
    import_pycuda,
    import_tensorrt,
    shared_logger,
    tensorrt_errors,
    tensorrt_major,
)

log = logging.getLogger(__name__)

STRONGLY_TYPED_FROM_MAJOR = 11


class TensorRTBackend(Backend):
    """Builds ``.plan`` engines with the TensorRT Python API and runs them with :class:`TensorRTRunner`.

    device_id: the GPU that :meth:`device` describes (builds and runs use ``BuildOptions.device_id``).
    """

    name = "tensorrt"
    engine_suffix = ".plan"

    def __init__(self, device_id: int = 0):
        self.device_id = device_id

    def check_available(self) -> None:
        import_tensorrt()
        if torch.cuda.is_available():
            return
        if import_pycuda().Device.count() == 0:
            raise BackendUnavailable(f"{INSTALL_HINT}; tensorrt is installed but no CUDA device is visible "
                                     f"(torch.cuda.is_available() is False and pycuda counts 0 GPUs)")

    def default_precision(self) -> str:
        return "tf32"  # TensorRT's own default: the TF32 builder flag is set unless cleared

    @property
    def runs_on_cuda(self) -> bool:
        return True

    def version(self) -> str:
        return import_tensorrt().__version__

    def device(self) -> str:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(self.device_id)
            major, minor = torch.cuda.get_device_capability(self.device_id)
        else:
            gpu = import_pycuda().Device(self.device_id)
            name, (major, minor) = gpu.name(), gpu.compute_capability()
        return f"cuda:{self.device_id} {name} (sm_{major}{minor})"

    # -- build ----------------------------------------------------------------------------------
    def build(self, onnx_path: Path, engine_path: Path, inputs: list[TensorSpec], options: BuildOptions) -> None:
        trt = import_tensorrt()
        onnx_path, engine_path = Path(onnx_path), Path(engine_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"no ONNX file at {onnx_path}; export the stage first")
        strongly_typed = tensorrt_major(trt) >= STRONGLY_TYPED_FROM_MAJOR
        with cuda_device(options.device_id), tempfile.TemporaryDirectory(prefix="prism-trt-") as scratch:
            parse_path = onnx_path
            if options.precision == "fp16" and strongly_typed:
                parse_path = Path(scratch) / f"{onnx_path.stem}.fp16.onnx"
                cast_onnx_to_fp16(onnx_path, parse_path)
            # In a function of its own so every TensorRT object is gone before the CUDA context is left.
            _build_engine(trt, onnx_path, parse_path, engine_path, inputs, options, strongly_typed)

    def load(self, engine_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
             options: BuildOptions, device: torch.device | None = None, cuda_graphs: bool = False) -> TensorRTRunner:
        """``device`` None: the runner follows its feed (device outputs for device inputs, host for host)."""
        if cuda_graphs:
            raise UsageError("CUDA graphs are an option of onnxruntime's CUDA EP here; the tensorrt backend "
                             "runs without them (leave --cuda-graphs off)")
        return TensorRTRunner(Path(engine_path), inputs, outputs, device_id=options.device_id, device=device)


def _build_engine(trt: Any, onnx_path: Path, parse_path: Path, engine_path: Path, inputs: list[TensorSpec],
                  options: BuildOptions, strongly_typed: bool) -> None:
    logger = shared_logger()
    logger.take_errors()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    # The parser owns the parsed weights: it must outlive build_serialized_network.
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parse_path)):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        copy_note = f" (fp16 copy of {onnx_path})" if parse_path != onnx_path else ""
        raise EngineBuildError(f"TensorRT could not parse {parse_path}{copy_note}:\n  "
                               + "\n  ".join(errors or [tensorrt_errors()]))
    _check_network_inputs(network, inputs, onnx_path)
    config = _builder_config(trt, builder, inputs, options,
                             weak_fp16=options.precision == "fp16" and not strongly_typed)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None:
        _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT built no engine from {onnx_path} ({options.precision}, batch {options.min_batch}/"
            f"{options.opt_batch}/{options.max_batch}, workspace {options.workspace_mib} MiB); {tensorrt_errors()}. "
            f"If it mentions memory, raise workspace_mib or lower max_batch.")
    _write_atomically(engine_path, bytes(serialized))
    if cache_path is not None:
        _write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    # TensorRT 10: explicit batch is the only mode, no flag needed. TensorRT 11: every network is
    # strongly typed; the flag is kept for compatibility (and ignored), so pass it while it exists.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if strongly_typed else None
    return 0 if flag is None else 1 << int(flag)


def _check_network_inputs(network: Any, inputs: list[TensorSpec], onnx_path: Path) -> None:
    """The ONNX inputs must be exactly the stage's TensorSpecs, with a dynamic batch axis where they say so."""
    found = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        found[tensor.name] = tuple(tensor.shape)
    expected = {spec.name: spec for spec in inputs}
    if set(found) != set(expected):
        raise EngineBuildError(f"{onnx_path} has inputs {sorted(found)}, the stage declares {sorted(expected)}; "
                               f"re-export the stage or fix its TensorSpecs")
    for name, spec in expected.items():
        dims = found[name]
        mismatch = len(dims) != len(spec.shape) or any(
            (want == BATCH_AXIS and got != -1) or (want != BATCH_AXIS and got not in (-1, want))
            for want, got in zip(spec.shape, dims))
        if mismatch:
            raise EngineBuildError(f"{onnx_path}: input {name!r} has shape {dims} (-1 = dynamic), the stage declares "
                                   f"{spec.shape}; export with a dynamic '{BATCH_AXIS}' axis exactly where the spec "
                                   f"has one")


def _builder_config(trt: Any, builder: Any, inputs: list[TensorSpec], options: BuildOptions, weak_fp16: bool) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT runs fp32 matmuls in TF32 (10-bit mantissa) on Ampere+ by default (the flag is set):
        # "tf32" and "fp16" keep that default, fp32 means fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for spec in inputs:
        profile.set_shape(spec.name, min=spec.concrete(options.min_batch), opt=spec.concrete(options.opt_batch),
                          max=spec.concrete(options.max_batch))
    config.add_optimization_profile(profile)
    return config


def _attach_timing_cache(config: Any, path: Path) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    # A cache from another TensorRT version or GPU is refused; start afresh rather than fail the build.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was written by another TensorRT version or GPU (%s); starting a new one there",
                    path, tensorrt_errors())
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomically(path: Path, data: bytes) -> None:
    # Readers (other stages, a concurrent build) never see a half-written engine or cache.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
