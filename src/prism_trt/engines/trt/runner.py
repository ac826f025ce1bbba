"""Runs a serialized TensorRT engine (TensorRT 10+ name-based I/O, ``execute_async_v3``).

Two buffer paths:

* torch CUDA tensors: TensorRT reads the inputs in place and writes into torch CUDA outputs the
  runner keeps per batch size (zero copy, no allocation in the steady state), with
  ``execute_async_v3`` on the device's compute stream, shared with torch and the other engines
  (:func:`~prism_trt.engines.device.compute_stream`): nothing synchronises per engine.
* host tensors (e.g. a Jetson torch build without CUDA): pycuda page-locked host buffers and device
  buffers sized for the engine's max batch, allocated once in ``activate``; each call copies in,
  runs, copies out on one pycuda stream and returns torch CPU copies.

A runner loaded for a device (a chain's) writes its outputs there, moving a feed that is not there
first; one loaded without (verification, tests) follows its feed: device outputs for a device
feed, host outputs for a host feed.

``tensorrt`` and ``pycuda`` are imported lazily so this module imports anywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import BATCH_AXIS, BackendUnavailable, EngineInputError, EngineLoadError, Runner, TensorSpec
from ..device import compute_stream

log = logging.getLogger(__name__)

INSTALL_HINT = ("the tensorrt backend needs `pip install .[trt]` (tensorrt>=10, pycuda) on a machine with an "
                "NVIDIA GPU")
MIN_TENSORRT_MAJOR = 10


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or BackendUnavailable saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # OSError: wheel present but libnvinfer missing
        raise BackendUnavailable(f"{INSTALL_HINT}; `import tensorrt` failed: {error!r}") from error
    if tensorrt_major(tensorrt) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(f"{INSTALL_HINT}; found tensorrt {tensorrt.__version__}, which predates the "
                                 f"name-based I/O API this backend uses")
    return tensorrt


def tensorrt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def import_pycuda() -> Any:
    """``pycuda.driver``, initialised, or BackendUnavailable saying what to install."""
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as error:
        raise BackendUnavailable(f"{INSTALL_HINT}; torch has no CUDA here, so the GPU is reached through pycuda, "
                                 f"but `import pycuda.driver` failed: {error!r}") from error
    try:
        cuda.init()
    except cuda.Error as error:
        raise BackendUnavailable(f"{INSTALL_HINT}; CUDA did not initialise (driver or GPU missing?): "
                                 f"{error}") from error
    return cuda


def pycuda_installed() -> bool:
    try:
        import pycuda.driver  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class PrimaryContext:
    """pycuda's handle on a device's primary context, the one the CUDA runtime (TensorRT, torch) uses.

    pycuda keeps a per-thread context stack; its allocations and copies need the context pushed,
    so every use goes through :meth:`current`, from whichever thread calls.
    """

    def __init__(self, device_id: int):
        self.cuda = import_pycuda()
        self._context = self.cuda.Device(device_id).retain_primary_context()

    @contextmanager
    def current(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._context.pop()

    def release(self) -> None:
        self._context.detach()


@contextmanager
def cuda_device(device_id: int) -> Iterator[None]:
    """Make ``device_id`` current for TensorRT calls: via torch when it has CUDA, else via pycuda."""
    if torch.cuda.is_available():
        with torch.cuda.device(device_id):
            yield
        return
    context = PrimaryContext(device_id)
    try:
        with context.current():
            yield
    finally:
        context.release()


_shared_logger = None


def shared_logger() -> Any:
    """One process-wide ``trt.ILogger`` (TensorRT wants one logger for every builder and runtime).

    It forwards TensorRT's messages to Python logging and keeps the errors, so raised exceptions can
    quote what TensorRT said instead of pointing at a console.
    """
    global _shared_logger
    if _shared_logger is None:
        trt = import_tensorrt()
        severity = trt.ILogger.Severity

        class RecordingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, level: Any, message: str) -> None:
                if level in (severity.INTERNAL_ERROR, severity.ERROR):
                    self.errors.append(message)
                    log.error("TensorRT: %s", message)
                elif level == severity.WARNING:
                    log.warning("TensorRT: %s", message)
                elif level == severity.INFO:
                    log.debug("TensorRT: %s", message)

            def take_errors(self) -> list[str]:
                errors, self.errors = self.errors, []
                return errors

        _shared_logger = RecordingLogger()
    return _shared_logger


def tensorrt_errors() -> str:
    """TensorRT's errors since the last call, as one line for an exception message."""
    errors = shared_logger().take_errors()
    return "TensorRT said: " + " | ".join(errors) if errors else "TensorRT logged no error"


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


class TensorRTRunner(Runner):
    """Runs one engine file; inputs and outputs are checked against the stage's TensorSpecs."""

    def __init__(self, engine_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], device_id: int = 0,
                 name: str | None = None, device: torch.device | None = None):
        gpu = torch.device("cuda", device_id)
        super().__init__(name or f"tensorrt:{Path(engine_path).name}", inputs, outputs,
                         device if device is not None else gpu if torch.cuda.is_available() else torch.device("cpu"))
        self.engine_path = Path(engine_path)
        self.device_id = device_id
        self.follows_feed = device is None
        self._outputs_of: dict[tuple, dict[str, torch.Tensor]] = {}  # device outputs per input shapes
        self._batch_axes = {name: spec.shape.index(BATCH_AXIS) for name, spec in self._inputs.items()
                            if BATCH_AXIS in spec.shape}
        self.min_batch = self.max_batch = 1  # read from the engine's optimization profile on activate
        self._pycuda: PrimaryContext | None = None
        self._host: dict[str, np.ndarray] = {}  # page-locked staging buffers, host path only
        self._device: dict[str, Any] = {}  # pycuda device buffers, host path only

    # -- life cycle -----------------------------------------------------------------------------
    def activate_impl(self) -> None:
        trt = import_tensorrt()
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"{self.name}: no engine file at {self.engine_path}; build it first")
        # Host feeds need pycuda; without torch CUDA it is also the only way to reach the GPU.
        use_pycuda = pycuda_installed() or not torch.cuda.is_available()
        self._pycuda = PrimaryContext(self.device_id) if use_pycuda else None
        self.stream = compute_stream(self.device) if self.device.type == "cuda" else None
        try:
            with self._scope():
                self._load_engine(trt)
                self._read_engine_io(trt)
                self._allocate_host_buffers()
        except BaseException:
            self._release()  # deactivate() never runs for a runner that did not become active
            raise

    def _load_engine(self, trt: Any) -> None:
        self._runtime = trt.Runtime(shared_logger())
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineLoadError(f"{self.name}: TensorRT could not load {self.engine_path} ({tensorrt_errors()}); "
                               f"engines only load with the TensorRT version and GPU that built them: rebuild it")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineLoadError(f"{self.name}: no execution context for {self.engine_path} ({tensorrt_errors()})")

    def _scope(self) -> AbstractContextManager[None]:
        # pycuda's context when it is in use (its buffers need it pushed), torch's device otherwise.
        return self._pycuda.current() if self._pycuda is not None else cuda_device(self.device_id)

    def _read_engine_io(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        self._input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if set(self._input_names) != set(self._inputs) or set(self._output_names) != set(self._outputs):
            raise EngineInputError(f"{self.name}: {self.engine_path} has inputs {self._input_names} and outputs "
                                   f"{self._output_names}, the stage expects {sorted(self._inputs)} -> "
                                   f"{sorted(self._outputs)}; rebuild the engine from this stage's ONNX")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        for name, spec in {**self._inputs, **self._outputs}.items():
            if self._dtypes[name] != np.dtype(spec.dtype):
                raise EngineInputError(f"{self.name}: engine tensor {name!r} is {self._dtypes[name]}, the stage "
                                       f"expects {spec.dtype}; rebuild the engine")
        mins, maxes = [], []
        for name, axis in self._batch_axes.items():
            low, _, high = engine.get_tensor_profile_shape(name, 0)
            mins.append(int(low[axis]))
            maxes.append(int(high[axis]))
        if mins:
            self.min_batch, self.max_batch = max(mins), min(maxes)
        # The output shapes at the max batch size the host buffers.
        self._max_shapes = {n: self._inputs[n].concrete(self.max_batch) for n in self._input_names}
        self._max_shapes.update(self._set_input_shapes(self._max_shapes))

    def _allocate_host_buffers(self) -> None:
        if self._pycuda is None:
            return
        cuda = self._pycuda.cuda
        self._stream = cuda.Stream()
        for name, shape in self._max_shapes.items():
            self._host[name] = cuda.pagelocked_empty(math.prod(shape), self._dtypes[name])
            self._device[name] = cuda.mem_alloc(max(self._host[name].nbytes, 1))

    def deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free buffers and TensorRT objects (whatever exists of them) while the CUDA context is current."""
        with self._scope():
            stream = self.__dict__.pop("_stream", None)
            if stream is not None:
                stream.synchronize()
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device_id)  # zero-copy calls may still be in flight
            for allocation in self._device.values():
                allocation.free()
            for array in self._host.values():
                array.base.free()
            self._host, self._device, self._outputs_of = {}, {}, {}
            for attribute in ("_context", "_engine", "_runtime"):  # in this order: each uses the next
                self.__dict__.pop(attribute, None)
        if self._pycuda is not None:
            self._pycuda.release()
            self._pycuda = None

    # -- inference ------------------------------------------------------------------------------
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = next((feed[name].shape[axis] for name, axis in self._batch_axes.items()), 1)
        if not self.min_batch <= batch <= self.max_batch:
            raise EngineInputError(f"{self.name}: batch {batch} is outside the engine's profile "
                                   f"{self.min_batch}..{self.max_batch} ({self.engine_path}); split the feed into "
                                   f"batches of at most {self.max_batch} or rebuild with a larger max_batch")
        if not self.follows_feed:
            if self.device.type == "cuda":
                return self._infer_on_device({name: tensor.to(self.device) for name, tensor in feed.items()})
            feed = {name: tensor.cpu() for name, tensor in feed.items()}
        on_cuda = {tensor.is_cuda for tensor in feed.values()}
        if on_cuda == {True}:
            return self._infer_on_device(feed)
        if on_cuda != {False}:
            raise EngineInputError(f"{self.name}: inputs must all be CUDA tensors or all host tensors, got a mix")
        if self._pycuda is not None:
            return self._infer_from_host(feed)
        # torch has CUDA but pycuda is missing: stage through torch instead.
        device = torch.device("cuda", self.device_id)
        outputs = self._infer_on_device({name: tensor.to(device) for name, tensor in feed.items()})
        return {name: tensor.cpu() for name, tensor in outputs.items()}

    def _set_input_shapes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Tell the context this call's input shapes; return the output shapes they imply."""
        for name in self._input_names:
            shape = tuple(input_shapes[name])
            if not self._context.set_input_shape(name, shape):
                raise EngineInputError(f"{self.name}: input {name!r} of shape {shape} does not fit the engine "
                                       f"profile ({tensorrt_errors()})")
        shapes = {name: tuple(self._context.get_tensor_shape(name)) for name in self._output_names}
        if any(dim < 0 for shape in shapes.values() for dim in shape):
            raise RuntimeError(f"{self.name}: output shapes {shapes} are data-dependent; this runner needs shapes "
                               f"known from the inputs")
        return shapes

    def _execute(self, stream_handle: int) -> None:
        if not self._context.execute_async_v3(stream_handle):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed on {self.engine_path} ({tensorrt_errors()})")

    def _infer_on_device(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = torch.device("cuda", self.device_id)
        wrong = {name: str(tensor.device) for name, tensor in feed.items() if tensor.device != device}
        if wrong:
            raise EngineInputError(f"{self.name}: the engine runs on {device}, inputs are on {wrong}")
        with torch.cuda.device(device):
            inputs = {name: feed[name].contiguous() for name in self._input_names}
            shapes = _shapes(inputs)
            key = tuple(sorted(shapes.items()))
            if key not in self._outputs_of:
                self._outputs_of[key] = {name: torch.empty(shape, dtype=_torch_dtype(self._dtypes[name]), device=device)
                                         for name, shape in self._set_input_shapes(shapes).items()}
            else:
                self._set_input_shapes(shapes)
            outputs = self._outputs_of[key]
            for name, tensor in {**inputs, **outputs}.items():
                self._context.set_tensor_address(name, tensor.data_ptr())
            stream = self.stream if self.stream is not None else torch.cuda.current_stream(device)
            self._execute(stream.cuda_stream)
        return dict(outputs)

    def _infer_from_host(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cuda = self._pycuda.cuda
        with self._pycuda.current():
            output_shapes = self._set_input_shapes(_shapes(feed))
            for name in self._input_names:
                array = feed[name].detach().contiguous().numpy().reshape(-1)
                if array.dtype != self._dtypes[name]:
                    raise EngineInputError(f"{self.name}: input {name!r} must be {self._dtypes[name]}, "
                                           f"got {array.dtype}")
                staged = self._host[name][: array.size]
                np.copyto(staged, array)
                if array.size:
                    cuda.memcpy_htod_async(self._device[name], staged, self._stream)
            for name, allocation in self._device.items():
                self._context.set_tensor_address(name, int(allocation))
            self._execute(self._stream.handle)
            for name, shape in output_shapes.items():
                if math.prod(shape):
                    cuda.memcpy_dtoh_async(self._host[name][: math.prod(shape)], self._device[name], self._stream)
            self._stream.synchronize()
        # Copies: the page-locked buffers are overwritten by the next call.
        return {name: torch.from_numpy(self._host[name][: math.prod(shape)].reshape(shape).copy())
                for name, shape in output_shapes.items()}
