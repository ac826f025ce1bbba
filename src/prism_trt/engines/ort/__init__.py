from .loader import OnnxRuntimeBackend
from .runner import OnnxRuntimeRunner

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner"]
