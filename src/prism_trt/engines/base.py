"""One interface for every engine backend, after Polygraphy's loader / runner split.

A *backend* builds an engine file from a stage's ONNX file (``build``) and loads it into a
*runner* (``load``). A runner has a small life cycle — ``activate`` -> ``input_metadata`` ->
``infer(feed)`` -> ``deactivate`` — takes and returns ``name -> torch.Tensor`` mappings (host or
device tensors; no positional guessing) and times its own ``infer``. A runner's outputs live on
its ``device``, the one it was loaded for, whatever the feed's.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..core.precision import check_precision
from ..errors import PrismError, UsageError
from .onnx_format import OnnxFormat, format_for

BATCH_AXIS = "batch"


class BackendUnavailable(PrismError, RuntimeError):
    """The backend's library or device is missing here; the message says what to install."""


class EngineBuildError(PrismError, RuntimeError):
    """An engine that could not be built from its ONNX file (the message names the file and the fix)."""


class EngineLoadError(PrismError, RuntimeError):
    """An engine file its backend cannot load here (other runtime version or GPU: rebuild it)."""


class EngineInputError(PrismError, ValueError):
    """A feed whose names, shapes or dtypes do not match the engine's inputs."""


@dataclass(frozen=True)
class TensorSpec:
    """An engine input or output. ``shape`` uses the string "batch" for the dynamic batch axis."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name, e.g. "float32"

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH_AXIS else int(d) for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


# Bounds on what a build may record, checked again when a manifest is read: the digest proves a
# manifest unedited only to someone who cannot recompute it, and max_batch sizes the server's body limit
MAX_BATCH_LIMIT = 4096
_INTEGER_BOUNDS = {"min_batch": (1, MAX_BATCH_LIMIT), "opt_batch": (1, MAX_BATCH_LIMIT),
                   "max_batch": (1, MAX_BATCH_LIMIT), "workspace_mib": (1, 1 << 20), "optimization_level": (0, 5),
                   "device_id": (0, 1023)}


@dataclass(frozen=True)
class BuildOptions:
    """How engines are built. Batch profile min/opt/max applies to the dynamic batch axis.

    precision: what the engines compute in: "fp32" (TF32 switched off on GPUs), "tf32" (fp32
        storage, matmul inputs rounded to TF32 on Ampere and newer: Jetson Orin, A100, H100) or
        "fp16" (TensorRT 10: FP16 builder flag; TensorRT 11+ and onnxruntime's CPU / CUDA EPs: an
        fp16-cast copy of the ONNX; onnxruntime's TensorRT EP: trt_fp16_enable). Engine inputs and
        outputs stay float32 in every precision; verification uses the precision's tolerance.
    workspace_mib: TensorRT memory pool limit for the workspace.
    optimization_level: TensorRT builder optimization level (0..5, default 3).
    timing_cache: file for TensorRT's timing cache, shared by every stage of a build.
    device_id: CUDA device ordinal.
    """

    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    optimization_level: int = 3
    timing_cache: str | None = None
    device_id: int = 0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in _INTEGER_BOUNDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        for name, (low, high) in _INTEGER_BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                shown = value if abs(value) < 10**12 else f"a {len(str(abs(value)))}-digit number"
                raise UsageError(f"{name} must be at least {low} and at most {high}, got {shown}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Runner(ABC):
    """Runs one loaded engine. Use as a context manager or call activate/deactivate.

    ``inputs`` / ``outputs`` are the engine's TensorSpecs, in the order the stage declares them.
    ``device``: where the outputs are written; ``stream``: the CUDA stream the engine runs on (None
    on the CPU), the device's compute stream (:func:`~.device.compute_stream`).
    """

    def __init__(self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device | None = None):
        self.name = name
        self._inputs = {spec.name: spec for spec in inputs}
        self._outputs = {spec.name: spec for spec in outputs}
        self.is_active = False
        self.last_infer_time_s: float | None = None
        self.device = torch.device("cpu") if device is None else device
        self.stream: torch.cuda.Stream | None = None

    # -- life cycle -----------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- metadata and inference -----------------------------------------------------------------
    def input_metadata(self) -> dict[str, TensorSpec]:
        """Input name -> TensorSpec, in the stage's order (a copy)."""
        return dict(self._inputs)

    def output_metadata(self) -> dict[str, TensorSpec]:
        """Output name -> TensorSpec, in the stage's order (a copy)."""
        return dict(self._outputs)

    def check_feed(self, feed: Mapping[str, torch.Tensor]) -> int:
        """Validate names, ranks, static dims, dtypes and a common batch; return the batch size."""
        expected = self.input_metadata()
        missing, unknown = sorted(set(expected) - set(feed)), sorted(set(feed) - set(expected))
        if missing or unknown:
            raise EngineInputError(f"{self.name}: inputs {sorted(expected)} expected; "
                                   f"missing {missing}, unknown {unknown}")
        batch = None
        for name, spec in expected.items():
            tensor = feed[name]
            if not isinstance(tensor, torch.Tensor):
                raise EngineInputError(f"{self.name}: input {name!r} must be a torch.Tensor, "
                                       f"got {type(tensor).__name__}")
            if str(tensor.dtype).removeprefix("torch.") != spec.dtype:
                raise EngineInputError(f"{self.name}: input {name!r} must be {spec.dtype}, got {tensor.dtype}")
            if tensor.dim() != len(spec.shape):
                raise EngineInputError(f"{self.name}: input {name!r} must have shape {spec.shape}, "
                                       f"got {tuple(tensor.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape)):
                if want == BATCH_AXIS:
                    if batch is not None and got != batch:
                        raise EngineInputError(f"{self.name}: inputs disagree on the batch size ({batch} vs {got})")
                    batch = got
                elif want != got:
                    raise EngineInputError(f"{self.name}: input {name!r} must have shape {spec.shape}, "
                                           f"got {tuple(tensor.shape)} (axis {axis})")
        return batch if batch is not None else 1

    def infer(self, feed: Mapping[str, torch.Tensor], check: bool = True) -> dict[str, torch.Tensor]:
        """Run the engine; ``last_infer_time_s`` holds the host time of the call. On a GPU that is
        the launch only: nothing synchronises here, callers time device work with CUDA events.

        A caller on another stream than the engine's is ordered with it both ways (stream waits,
        no host synchronisation): the engine reads the feed after the caller wrote it, the caller
        reads the outputs after the engine wrote them."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner before infer()")
        if check:
            self.check_feed(feed)
        caller = torch.cuda.current_stream(self.stream.device) if self.stream is not None else None
        foreign = caller is not None and caller != self.stream
        if foreign:
            self.stream.wait_stream(caller)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_infer_time_s = time.perf_counter() - start
        if foreign:
            caller.wait_stream(self.stream)
        return outputs

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class Backend(ABC):
    """Builds engine files from stage ONNX files and loads them into runners."""

    name: ClassVar[str]
    engine_suffix: ClassVar[str]

    @abstractmethod
    def check_available(self) -> None:
        """Raise BackendUnavailable (naming what to install) when this backend, as configured, cannot run here."""

    def default_precision(self) -> str:
        """The precision builds get when none is asked for: what the runtime itself defaults to."""
        return "fp32"

    def unsupported_precisions(self) -> dict[str, str]:
        """Precisions this backend cannot build, each with the reason."""
        return {}

    def resolve_precision(self, requested: str | None) -> str:
        """``requested`` (or the default) after checking this backend can build it."""
        precision = self.default_precision() if requested is None else check_precision(requested)
        reason = self.unsupported_precisions().get(precision)
        if reason:
            raise UsageError(f"precision {precision} is not available with {self.name} on {self.device()}: {reason}")
        return precision

    @property
    def runs_on_cuda(self) -> bool:
        """Whether engines run on a CUDA device (verification then feeds device tensors when it can)."""
        return False

    def tensor_device(self, options: BuildOptions) -> torch.device:
        """Where a runner loaded without a device writes its outputs: the engine's own device where
        torch can hold tensors there, else the host."""
        if self.runs_on_cuda and torch.cuda.is_available():
            return torch.device("cuda", options.device_id)
        return torch.device("cpu")

    def check_device(self, device: torch.device) -> None:
        """Raise a UsageError when this backend's runners cannot write outputs on ``device``."""
        if device.type == "cuda" and not self.runs_on_cuda:
            raise UsageError(f"{self.name} on {self.device()} runs engines on the CPU, not on {device}; use "
                             f"--device cpu, or build the engines for a GPU (--provider cuda or --backend tensorrt)")

    def onnx_format(self) -> OnnxFormat:
        """The opset and IR version to write for this backend's runtime."""
        return format_for(self.name, self.version())

    @abstractmethod
    def version(self) -> str:
        """Library version that built / runs the engines (part of the engine cache key)."""

    @abstractmethod
    def device(self) -> str:
        """Where engines run, e.g. "cpu" or "cuda:0 NVIDIA Orin (sm_87)" (part of the cache key)."""

    @abstractmethod
    def build(self, onnx_path: Path, engine_path: Path, inputs: list[TensorSpec], options: BuildOptions) -> None:
        """Compile ``onnx_path`` into ``engine_path`` for the given inputs and options."""

    @abstractmethod
    def load(self, engine_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
             options: BuildOptions, device: torch.device | None = None, cuda_graphs: bool = False) -> Runner:
        """A runner (not yet active) for an engine file built by this backend, writing its outputs
        on ``device`` (None: :meth:`tensor_device`). ``cuda_graphs``: capture one CUDA graph per batch
        size and replay it (the backend refuses it where it cannot; the feed's addresses must then
        stay fixed per batch size, as the runtime's reused buffers keep them)."""
