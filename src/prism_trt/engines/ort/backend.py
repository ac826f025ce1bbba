"""onnxruntime backend, building side: offline graph optimisation (or the fp16 cast) and session
options per EP, following the build's precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import UsageError
from ..base import Backend, BackendUnavailable, BuildOptions, EngineBuildError, Runner, TensorSpec
from ..device import resolve_device
from ..fp16 import cast_onnx_to_fp16
from ..onnx_format import OnnxFormat, format_for, stamp_ir_version

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _profile_shapes(inputs: list[TensorSpec], batch: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in t.concrete(batch))}" for t in inputs)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU EP (x86 and fallback), or the CUDA / TensorRT EPs where installed.

    provider: "cpu", "cuda" or "tensorrt". threads: intra-op threads (None: onnxruntime default).
    cache_dir: where the TensorRT EP keeps its engine and timing caches.
    """

    name = "onnxruntime"
    engine_suffix = ".ort.onnx"

    def __init__(self, provider: str = "cpu", threads: int | None = None, cache_dir: Path | None = None):
        if provider not in PROVIDERS:
            raise UsageError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        self.provider, self.threads, self.cache_dir = provider, threads, cache_dir

    def check_available(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise BackendUnavailable(f"the onnxruntime backend needs `pip install onnxruntime`: {error}") from error
        if PROVIDERS[self.provider] not in ort.get_available_providers():
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} here has no {PROVIDERS[self.provider]} (available: "
                f"{', '.join(ort.get_available_providers())}); install `pip install .[gpu]` (onnxruntime-gpu) on a "
                f"machine with an NVIDIA GPU, or use --provider cpu")

    def default_precision(self) -> str:
        # onnxruntime's own defaults: fp32 on the CPU, TF32 matmuls on CUDA (use_tf32=1) and TensorRT.
        return "fp32" if self.provider == "cpu" else "tf32"

    def unsupported_precisions(self) -> dict[str, str]:
        if self.provider == "cpu":
            return {"tf32": "TF32 is a math mode of NVIDIA GPUs (Ampere and newer); the CPU EP computes in fp32"}
        if self.provider == "tensorrt":
            return {"fp32": "the TensorRT EP has no switch for TensorRT's default TF32 math; use --provider cuda "
                            "or the native tensorrt backend for strict fp32"}
        return {}

    @property
    def runs_on_cuda(self) -> bool:
        return self.provider != "cpu"

    def onnx_format(self) -> OnnxFormat:
        return format_for("onnxruntime")  # probed from the installed runtime

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def device(self) -> str:
        if self.provider == "cpu":
            return "cpu"
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
        return f"{self.provider}:{name}"

    def session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        # A chain holds one session per stage, each with its own intra-op pool. Threads that spin
        # after a run steal the cores from the next stage (and from GLOO's threads): measured on
        # 2 cores, vit_tiny batch 1 took 134 ms with spinning and 17 ms without. A process-wide
        # pool was ~15 % faster still, but its threads spin regardless and slow everything else.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options

    def providers(self, inputs: list[TensorSpec], options: BuildOptions, stream=None, cuda_graphs: bool = False
                  ) -> list:
        """Execution providers with their options; always ending with the CPU EP as fallback.
        ``stream``: the torch CUDA stream the GPU EP runs on (shared with torch); ``cuda_graphs``:
        the CUDA EP captures and replays CUDA graphs."""
        providers: list = []
        # onnxruntime takes the stream as its handle in decimal; has_user_compute_stream for older versions
        shared = {} if stream is None else {"has_user_compute_stream": "1",
                                            "user_compute_stream": str(stream.cuda_stream)}
        if self.provider == "tensorrt":
            cache = str(self.cache_dir or Path(options.timing_cache or ".").parent / "ort_trt_cache")
            os.makedirs(cache, exist_ok=True)
            providers.append((PROVIDERS["tensorrt"], {
                "device_id": options.device_id,
                "trt_fp16_enable": options.precision == "fp16",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
                "trt_max_workspace_size": options.workspace_mib << 20,
                "trt_builder_optimization_level": options.optimization_level,
                "trt_profile_min_shapes": _profile_shapes(inputs, options.min_batch),
                "trt_profile_opt_shapes": _profile_shapes(inputs, options.opt_batch),
                "trt_profile_max_shapes": _profile_shapes(inputs, options.max_batch),
                **shared,
            }))
        if self.provider in ("tensorrt", "cuda"):
            # The CUDA EP rounds fp32 matmul inputs to TF32 unless told not to (use_tf32 defaults to 1).
            providers.append((PROVIDERS["cuda"], {"device_id": options.device_id,
                                                  "use_tf32": int(options.precision == "tf32"), **shared,
                                                  **({"enable_cuda_graph": "1"} if cuda_graphs else {})}))
        providers.append(PROVIDERS["cpu"])
        return providers

    def build(self, onnx_path: Path, engine_path: Path, inputs: list[TensorSpec], options: BuildOptions) -> None:
        """fp32 / tf32: save the graph after onnxruntime's basic (EP independent) optimisations; the
        session applies the EP specific ones when it loads. fp16 on the CPU / CUDA EPs: the engine
        is the fp16-cast graph (float32 I/O), left for the session to optimise: an optimisation pass
        on the CPU EP would insert casts back to fp32 wherever the CPU lacks an fp16 kernel."""
        import onnx
        import onnxruntime as ort

        self.check_available()
        if options.precision == "fp16" and self.provider != "tensorrt":
            cast_onnx_to_fp16(onnx_path, engine_path)
            return
        session_options = self.session_options()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.optimized_model_filepath = str(engine_path)
        ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
        if not Path(engine_path).is_file():
            raise EngineBuildError(f"onnxruntime did not write the optimised model {engine_path}")
        # onnxruntime stamps the IR version it was built with; older runtimes refuse that needlessly.
        optimised = onnx.load(str(engine_path))
        onnx.save(stamp_ir_version(optimised), str(engine_path))

    def load(self, engine_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
             options: BuildOptions, device: torch.device | None = None, cuda_graphs: bool = False) -> Runner:
        from .runner import OnnxRuntimeRunner

        device = self.tensor_device(options) if device is None else resolve_device(device)
        self.check_device(device)
        if cuda_graphs and (self.provider != "cuda" or device.type != "cuda"):
            raise UsageError(f"CUDA graphs need onnxruntime's CUDA EP with tensors on the GPU (--provider cuda "
                             f"--device cuda:N); these engines use the {self.provider} EP with tensors on {device}")
        return OnnxRuntimeRunner(Path(engine_path), self, inputs, outputs, options, device, cuda_graphs)
