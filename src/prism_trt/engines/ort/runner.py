"""onnxruntime backend, running side: one session per stage, inputs and outputs bound in place.

Outputs are written into buffers the runner keeps per batch size (IOBinding) on the runner's own
device — the one the chain runs on, never wherever the feed happens to be — so on a GPU every
stage's activations stay there. No output copy and no allocation in the steady state. They stay
valid until the runner's next ``infer`` — the chain consumes them before that, and clones what it
returns to callers.

On CUDA the session runs on the device's compute stream (``user_compute_stream``), shared with
torch, and returns without synchronising (``disable_synchronize_execution_providers``): the next
stage is ordered after this one by the stream. With ``cuda_graphs`` the CUDA EP captures one graph
per batch size (``gpu_graph_id``) on its first run and replays it after; the bound addresses must
then stay the same per batch size, which the reused output buffers (and the runtime's reused
request and staging buffers) give.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..base import BATCH_AXIS, BuildOptions, EngineLoadError, Runner, TensorSpec
from ..device import compute_stream


class OnnxRuntimeRunner(Runner):
    def __init__(self, path: Path, backend, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 options: BuildOptions, device: torch.device, cuda_graphs: bool = False):
        super().__init__(f"onnxruntime:{path.name}", inputs, outputs, device)
        self.path, self.backend, self.options, self.cuda_graphs = path, backend, options, cuda_graphs
        self.session = None
        self._binding = None
        self._run_options: dict[int, object] = {}  # per batch size (its CUDA graph's id)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}

    def activate_impl(self) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        # what onnxruntime raises for a file it cannot parse or run here (a corrupt engine, one written
        # by a newer onnxruntime); they derive from Exception only
        unloadable = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail,
                      ort_errors.NotImplemented, ort_errors.NoSuchFile)
        self.stream = compute_stream(self.device)
        providers = self.backend.providers(list(self._inputs.values()), self.options, self.stream, self.cuda_graphs)
        try:
            self.session = ort.InferenceSession(str(self.path), self.backend.session_options(), providers=providers)
        except unloadable as problem:
            raise EngineLoadError(f"{self.path}: onnxruntime {ort.__version__} cannot load this engine ({problem}); "
                                  f"the file is corrupt or was built by another onnxruntime: rebuild with "
                                  f"`prism-trt build`") from None
        self._binding = self.session.io_binding()

    def deactivate_impl(self) -> None:
        self.session, self._binding = None, None
        self._buffers.clear()
        self._run_options.clear()

    def output_buffers(self, batch: int) -> dict[str, torch.Tensor]:
        """The reused output tensors for one batch size, on the runner's device (allocated on first use)."""
        if batch not in self._buffers:
            self._buffers[batch] = {name: torch.empty(spec.concrete(batch), dtype=torch.float32, device=self.device)
                                    for name, spec in self._outputs.items()}
        return self._buffers[batch]

    def run_options(self, batch: int):
        """The RunOptions of one batch size: on CUDA no synchronisation at the end of the run, and
        with CUDA graphs the batch size as the graph's id."""
        if batch not in self._run_options:
            import onnxruntime as ort

            options = ort.RunOptions()
            if self.stream is not None:
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
                if self.cuda_graphs:
                    options.add_run_config_entry("gpu_graph_id", str(batch))  # ids from 1; 0 is onnxruntime's
            self._run_options[batch] = options
        return self._run_options[batch]

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        keep_alive = []
        batch = 1
        for name, tensor in feed.items():
            tensor = tensor.contiguous()
            keep_alive.append(tensor)
            kind, index = _where(tensor.device)
            binding.bind_input(name, kind, index, np.dtype(self._inputs[name].dtype), list(tensor.shape),
                               tensor.data_ptr())
            if BATCH_AXIS in self._inputs[name].shape:
                batch = tensor.shape[self._inputs[name].shape.index(BATCH_AXIS)]
        outputs = self.output_buffers(batch)
        kind, index = _where(self.device)
        for name, out in outputs.items():
            binding.bind_output(name, kind, index, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding, self.run_options(batch))
        return dict(outputs)


def _where(device: torch.device) -> tuple[str, int]:
    """onnxruntime's name and index of a torch device."""
    return ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
