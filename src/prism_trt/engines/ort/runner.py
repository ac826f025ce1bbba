"""onnxruntime backend, running side: one session per stage, inputs and outputs bound in place.

Outputs are written into buffers the runner keeps per batch size (IOBinding), on the CPU as on
CUDA: no output copy and no allocation in the steady state. They stay valid until the runner's
next ``infer`` — the chain consumes them before that, and clones what it returns to callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..base import BuildOptions, EngineLoadError, Runner, TensorSpec


class OnnxRuntimeRunner(Runner):
    def __init__(self, path: Path, backend, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 options: BuildOptions):
        super().__init__(f"onnxruntime:{path.name}", inputs, outputs)
        self.path, self.backend, self.options = path, backend, options
        self.session = None
        self._binding = None
        self._buffers: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def activate_impl(self) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        # what onnxruntime raises for a file it cannot parse or run here (a corrupt engine, one written
        # by a newer onnxruntime); they derive from Exception only
        unloadable = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail,
                      ort_errors.NotImplemented, ort_errors.NoSuchFile)
        try:
            self.session = ort.InferenceSession(str(self.path), self.backend.session_options(),
                                                providers=self.backend.providers(list(self._inputs.values()),
                                                                                 self.options))
        except unloadable as problem:
            raise EngineLoadError(f"{self.path}: onnxruntime {ort.__version__} cannot load this engine ({problem}); "
                                  f"the file is corrupt or was built by another onnxruntime: rebuild with "
                                  f"`prism-trt build`") from None
        self._binding = self.session.io_binding()

    def deactivate_impl(self) -> None:
        self.session, self._binding = None, None
        self._buffers.clear()

    def output_buffers(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The reused output tensors for one batch size on one device (allocated on first use)."""
        key = (str(device), batch)
        if key not in self._buffers:
            self._buffers[key] = {name: torch.empty(spec.concrete(batch), dtype=torch.float32, device=device)
                                  for name, spec in self._outputs.items()}
        return self._buffers[key]

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = next(iter(feed.values()))
        device = first.device
        kind, index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        keep_alive = []
        for name, tensor in feed.items():
            tensor = tensor.contiguous()
            keep_alive.append(tensor)
            binding.bind_input(name, kind, index, np.dtype(self._inputs[name].dtype), list(tensor.shape),
                               tensor.data_ptr())
        outputs = self.output_buffers(first.shape[0], device)
        for name, out in outputs.items():
            binding.bind_output(name, kind, index, np.float32, list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return dict(outputs)
