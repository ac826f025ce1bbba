"""A stand-in for ``pycuda.driver`` on the CPU: the same calls PycudaStaging makes, each copy a
real ``ctypes.memmove`` between the addresses it is given, counted. "Device" memory is host
memory here (torch CPU tensors, or numpy arrays behind a fake allocation), so wrong offsets,
sizes or pitches show up as wrong values, and the byte counts are the ones a GPU would move."""

from __future__ import annotations

import ctypes
import time
from collections import Counter

import numpy as np


class FakeContext:
    def __init__(self):
        self.depth = 0

    def push(self):
        self.depth += 1

    def pop(self):
        assert self.depth > 0, "popped a context that was not pushed"
        self.depth -= 1


class FakeDevice:
    def __init__(self, driver, index):
        self.driver, self.index = driver, index

    def retain_primary_context(self):
        return self.driver.context


class FakeStream:
    handle = 0

    def synchronize(self):
        pass


class FakeEvent:
    def __init__(self, driver):
        self.driver, self.at = driver, None

    def record(self, stream=None):
        self.driver.check_current()
        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def time_since(self, start) -> float:
        return (self.at - start.at) * 1e3


class FakeAllocation:
    def __init__(self, nbytes):
        self.memory = np.zeros(nbytes, np.uint8)

    def __int__(self):
        return self.memory.ctypes.data


class FakeMemcpy2D:
    def __init__(self, driver):
        self.driver = driver

    def set_src_device(self, address):
        self.src = int(address)

    def set_dst_device(self, address):
        self.dst = int(address)

    def __call__(self, stream=None):
        self.driver.check_current()
        for row in range(self.height):
            ctypes.memmove(self.dst + row * self.dst_pitch, self.src + row * self.src_pitch, self.width_in_bytes)
        self.driver.bytes["dtod"] += self.width_in_bytes * self.height


class FakeDriver:
    """What PycudaStaging uses of ``pycuda.driver``; ``bytes`` and ``calls`` count the copies."""

    def __init__(self):
        self.context = FakeContext()
        self.bytes, self.calls = Counter(), Counter()
        self.allocations: list[FakeAllocation] = []

    def check_current(self):
        assert self.context.depth > 0, "a pycuda call outside the primary context"

    def Device(self, index):  # noqa: N802 - pycuda's name
        return FakeDevice(self, index)

    def Stream(self):  # noqa: N802
        self.check_current()
        return FakeStream()

    def Event(self):  # noqa: N802
        return FakeEvent(self)

    def Memcpy2D(self):  # noqa: N802
        return FakeMemcpy2D(self)

    def pagelocked_empty(self, shape, dtype):
        self.check_current()
        return np.full(shape, np.nan, dtype)  # not zeroed, like page-locked memory

    def mem_alloc(self, nbytes):
        self.check_current()
        self.allocations.append(FakeAllocation(nbytes))
        return self.allocations[-1]

    def memset_d8(self, allocation, value, count):
        ctypes.memset(int(allocation), value, count)

    def memcpy_dtoh_async(self, dest: np.ndarray, src, stream=None):
        self.check_current()
        assert dest.flags.c_contiguous
        ctypes.memmove(dest.ctypes.data, int(src), dest.nbytes)
        self.bytes["dtoh"] += dest.nbytes
        self.calls["dtoh"] += 1

    def memcpy_htod_async(self, dest, src: np.ndarray, stream=None):
        self.check_current()
        assert src.flags.c_contiguous
        ctypes.memmove(int(dest), src.ctypes.data, src.nbytes)
        self.bytes["htod"] += src.nbytes
        self.calls["htod"] += 1


def read_device(tensor) -> np.ndarray:
    """A DeviceTensor's contents (fake memory is host memory)."""
    interface = tensor.__cuda_array_interface__
    count = int(np.prod(interface["shape"]))
    buffer = (ctypes.c_char * (count * np.dtype(interface["typestr"]).itemsize)).from_address(interface["data"][0])
    return np.frombuffer(buffer, dtype=np.dtype(interface["typestr"])).reshape(interface["shape"]).copy()


def write_device(tensor, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values, dtype=tensor.dtype)
    ctypes.memmove(tensor.address, values.ctypes.data, values.nbytes)
