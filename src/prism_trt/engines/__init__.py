"""Engine backends behind one interface (Polygraphy-style loaders and runners), and the typed
records every later layer shares: chain keys, stage specs, manifests and performance maps."""

from ..core.chain_key import ChainKey, Mode
from .base import Backend, BackendUnavailable, BuildOptions, EngineInputError, Runner, TensorSpec
from .manifest import ChainConfig, Manifest, ManifestError, StageEntry, rank_directory
from .perfmap import AccuracyEntry, PerfMap, PerfMapError, PerfPoint
from .registry import BACKENDS, get_backend
from .stage_spec import StageSpec

__all__ = ["Backend", "BackendUnavailable", "BuildOptions", "EngineInputError", "Runner", "TensorSpec",
           "ChainKey", "Mode", "ChainConfig", "Manifest", "ManifestError", "StageEntry", "rank_directory",
           "AccuracyEntry", "PerfMap", "PerfMapError", "PerfPoint", "BACKENDS", "get_backend", "StageSpec"]
