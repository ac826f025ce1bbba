"""Backends by name: "onnxruntime" (CPU/CUDA/TensorRT EPs) and "tensorrt" (native)."""

from __future__ import annotations

from ..errors import UsageError
from .base import Backend

BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str, provider: str = "cpu", threads: int | None = None) -> Backend:
    """A ready backend; raises BackendUnavailable naming what to install when it cannot run here."""
    if name == "onnxruntime":
        from .ort import OnnxRuntimeBackend

        backend: Backend = OnnxRuntimeBackend(provider, threads)
    elif name == "tensorrt":
        from .trt import TensorRTBackend

        backend = TensorRTBackend()
    else:
        raise UsageError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    backend.check_available()
    return backend
