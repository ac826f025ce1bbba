"""Native TensorRT backend: builds ``.plan`` engines from stage ONNX files and runs them.

Needs ``pip install .[trt]`` (tensorrt>=10, pycuda) and an NVIDIA GPU; importing this package
does not, so the rest of prism-trt works (and can report what is missing) without them.
"""

from .backend import EngineBuildError, TensorRTBackend
from .runner import TensorRTRunner

__all__ = ["EngineBuildError", "TensorRTBackend", "TensorRTRunner"]
