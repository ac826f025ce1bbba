"""Backends by name: "onnxruntime" (CPU/CUDA/TensorRT EPs) and "tensorrt" (native)."""

from __future__ import annotations

from .base import Backend

BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str, provider: str = "cpu", threads: int | None = None) -> Backend:
    """A ready backend; raises BackendUnavailable naming what to install when it cannot run here."""
    if name == "onnxruntime":
        from .ort import OnnxRuntimeBackend

        OnnxRuntimeBackend.check_available(provider)
        return OnnxRuntimeBackend(provider, threads)
    if name == "tensorrt":
        from .trt import TensorRTBackend

        TensorRTBackend.check_available()
        return TensorRTBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
