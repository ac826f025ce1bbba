"""Staging with pycuda, beside the torch one (:mod:`.staging`): page-locked host buffers,
``memcpy_dtoh_async`` / ``memcpy_htod_async`` on one stream, CUDA events timing every copy, in the
device's primary context (the one the CUDA runtime, so torch, onnxruntime and TensorRT, uses).

It shares everything but the copies with the torch staging (:class:`~.staging.SlotLayout` decides
what is copied where): a board whose TensorRT reaches the GPU without a CUDA-enabled torch stages
with it, and a board with both can choose it (``--staging pycuda``).

The stream is pycuda's, created here; :attr:`PycudaStaging.stream_handle` is its ``cudaStream_t``,
for torch (``torch.cuda.ExternalStream``), onnxruntime (``user_compute_stream``) and TensorRT
(``execute_async_v3``) to run the blocks on, so that a copy waits only for the block before it.

Device memory: torch tensors where torch has CUDA (the pack with the cast to the exchange dtype,
and the unpack back, are torch ops on this stream); otherwise pycuda allocations
(:class:`DeviceTensor`, readable through ``__cuda_array_interface__``), packed and unpacked with
device-to-device 2D copies, which cannot cast: there the engines' dtype must be the exchange dtype.

``pycuda`` is imported lazily; a ``driver`` object with the same functions can stand in for it
(the tests run the bookkeeping and every copy on the CPU with one built on ``ctypes.memmove``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError
from .options import ExchangeDtype
from .staging import Staging, StagingBuffers

PYCUDA_HINT = "pycuda staging needs `pip install pycuda` and an NVIDIA GPU; or use --staging torch"


def import_pycuda_driver():
    """``pycuda.driver``, initialised, or a UsageError saying what to install."""
    try:
        import pycuda.driver as driver
    except (ImportError, OSError) as error:
        raise UsageError(f"{PYCUDA_HINT} (`import pycuda.driver` failed: {error!r})") from error
    driver.init()
    return driver


@dataclass
class DeviceTensor:
    """A pycuda device allocation seen as a C-contiguous tensor (used where torch has no CUDA)."""

    allocation: object  # pycuda DeviceAllocation (int() is its address); kept alive here
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def address(self) -> int:
        return int(self.allocation)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": np.dtype(self.dtype).str, "data": (self.address, False),
                "version": 3, "strides": None}


def device_address(tensor) -> int:
    """The device address of a torch tensor, a :class:`DeviceTensor`, an onnxruntime ``OrtValue``
    or anything with ``__cuda_array_interface__``."""
    if isinstance(tensor, torch.Tensor):
        return tensor.data_ptr()
    if isinstance(tensor, DeviceTensor):
        return tensor.address
    interface = getattr(tensor, "__cuda_array_interface__", None)
    if interface is not None:
        return int(interface["data"][0])
    return int(tensor.data_ptr())


class PycudaStaging(Staging):
    """Page-locked pycuda host buffers and asynchronous copies on pycuda's stream, timed with CUDA
    events; the copy of each direction is waited for before its data is needed, like the torch kind.

    driver: ``pycuda.driver`` (default) or a stand-in; torch_memory: whether device buffers are
    torch tensors (default: where torch has CUDA, or on the CPU with a stand-in driver).
    """

    name = "pycuda"

    def __init__(self, counts: list[int], rank: int, dim: int, device: str = "cuda", attended: list[int] | None = None,
                 exchange_dtype: ExchangeDtype = ExchangeDtype.FP32, engine_dtype: torch.dtype = torch.float32,
                 driver=None, torch_memory: bool | None = None):
        super().__init__(counts, rank, dim, device, attended, exchange_dtype, engine_dtype)
        self.driver = driver if driver is not None else import_pycuda_driver()
        self.torch_memory = torch.cuda.is_available() if torch_memory is None else torch_memory
        if not self.torch_memory and self.dtype != engine_dtype:
            raise UsageError(f"{exchange_dtype} exchange with {engine_dtype} engines casts on the device, which needs "
                             f"a CUDA-enabled torch; use --exchange-dtype auto (the engines' dtype) here")
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
        self._context = self.driver.Device(index).retain_primary_context()
        with self.in_context():
            self.stream = self.driver.Stream()
            self._events = [self.driver.Event() for _ in range(4)]
        self._torch_stream = None
        self.last_d2h_ms: float | None = None  # the latest copy of each direction, timed by events
        self.last_h2d_ms: float | None = None

    @contextmanager
    def in_context(self):
        """The device's primary context pushed (pycuda's allocations and copies need it current)."""
        self._context.push()
        try:
            yield
        finally:
            self._context.pop()

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def torch_stream(self):
        """This staging's stream as a torch stream (``with torch.cuda.stream(...)``), where torch has CUDA."""
        if self._torch_stream is None:
            self._torch_stream = torch.cuda.ExternalStream(self.stream_handle, device=self.device)
        return self._torch_stream

    @contextmanager
    def _torch_on_stream(self):
        """Torch ops on this staging's stream, after what torch's current stream has queued (the
        block that made the means, where the engines do not run on this stream)."""
        if self.torch_memory and self.device.type == "cuda":
            stream = self.torch_stream()
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                yield
        else:
            yield

    def _host(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self.in_context():
            array = self.driver.pagelocked_empty(shape, np.dtype(str(self.dtype).removeprefix("torch.")))
        array.fill(0)
        return torch.from_numpy(array)  # shares the page-locked memory; GLOO reads and writes it

    def _device(self, shape: tuple[int, ...], dtype: torch.dtype):
        if self.torch_memory:
            return super()._device(shape, dtype)
        numpy_dtype = np.dtype(str(dtype).removeprefix("torch."))
        with self.in_context():
            allocation = self.driver.mem_alloc(max(int(np.prod(shape)) * numpy_dtype.itemsize, 1))
            self.driver.memset_d8(allocation, 0, int(np.prod(shape)) * numpy_dtype.itemsize)
        return DeviceTensor(allocation, tuple(shape), numpy_dtype)

    def to_host(self, means, buffers: StagingBuffers) -> torch.Tensor:
        start, end = self._events[0], self._events[1]
        with self.in_context():
            if means is None:  # nobody reads this rank's means: its slot goes out untouched
                return buffers.send
            source = self._pack(buffers, means)
            start.record(self.stream)
            self.driver.memcpy_dtoh_async(buffers.send.numpy(), device_address(source), self.stream)
            end.record(self.stream)
            end.synchronize()  # GLOO reads the host slot next
            self.last_d2h_ms = end.time_since(start)
        return buffers.send

    def to_device(self, buffers: StagingBuffers):
        if not self.attended:
            return None
        start, end = self._events[2], self._events[3]
        slot_bytes = self.layout.slot_elements(buffers.send.shape[0]) * self.itemsize
        base = device_address(buffers.device_slots)
        with self.in_context():
            start.record(self.stream)
            for first, stop in self.layout.runs:
                self.driver.memcpy_htod_async(base + first * slot_bytes, buffers.host_slots[first:stop].numpy(),
                                              self.stream)
            end.record(self.stream)
            self._unpack(buffers)
            self.stream.synchronize()  # the next block may run on another stream than this one
            self.last_h2d_ms = end.time_since(start)
        return buffers.remote

    def _pack(self, buffers: StagingBuffers, means):
        """This rank's means into the padded device send slot, in the exchange dtype; returns what
        the device -> host copy reads (see :meth:`~.staging.Staging.packed`)."""
        if self.torch_memory:
            with self._torch_on_stream():
                return self.packed(means, buffers)
        if isinstance(means, torch.Tensor):  # without CUDA torch a torch tensor is host memory
            raise UsageError("the engines returned host tensors, so their runner already staged them (TensorRT "
                             "without CUDA-enabled torch copies through pycuda itself): run with --device cpu, "
                             "whose host staging serves the collective")
        batch, count = means.shape[0], means.shape[1]
        row = count * self.dim * self.itemsize
        self._copy_2d(device_address(buffers.device_send), self.max_count * self.dim * self.itemsize,
                      device_address(means), row, row, batch)
        return buffers.device_send

    def _unpack(self, buffers: StagingBuffers) -> None:
        """The attended device slots, sliced to their counts, into the remote tensor (engines' dtype)."""
        if self.torch_memory:
            with self._torch_on_stream():
                for q, offset, count in self.layout.pieces:
                    buffers.remote[:, offset: offset + count].copy_(buffers.device_slots[q, :, :count])
            return
        batch, entry = buffers.send.shape[0], self.dim * self.itemsize
        slot_pitch, remote_pitch = self.max_count * entry, self.layout.remote_count * entry
        gathered, remote = device_address(buffers.device_slots), device_address(buffers.remote)
        for q, offset, count in self.layout.pieces:
            self._copy_2d(remote + offset * entry, remote_pitch, gathered + q * batch * slot_pitch, slot_pitch,
                          count * entry, batch)

    def _copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """``height`` rows of ``width`` bytes, device to device, on the stream."""
        copy = self.driver.Memcpy2D()
        copy.set_src_device(src)
        copy.set_dst_device(dst)
        copy.src_pitch, copy.dst_pitch, copy.width_in_bytes, copy.height = src_pitch, dst_pitch, width, height
        copy(self.stream)

    def synchronize(self) -> None:
        with self.in_context():
            self.stream.synchronize()
