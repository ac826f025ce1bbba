from .backend import OnnxRuntimeBackend
from .runner import OnnxRuntimeRunner

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner"]
