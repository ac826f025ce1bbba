"""Engine backends behind one interface (Polygraphy-style loaders and runners) and manifests."""

from .base import Backend, BackendUnavailable, BuildOptions, EngineInputError, Runner, TensorSpec
from .manifest import ManifestError, load_manifest
from .registry import BACKENDS, get_backend

__all__ = ["Backend", "BackendUnavailable", "BuildOptions", "EngineInputError", "Runner", "TensorSpec",
           "ManifestError", "load_manifest", "BACKENDS", "get_backend"]
