"""onnxruntime backend, running side: a session per stage; CUDA tensors bound without copies."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..base import BuildOptions, Runner, TensorSpec


class OnnxRuntimeRunner(Runner):
    def __init__(self, path: Path, backend, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 options: BuildOptions):
        super().__init__(f"onnxruntime:{path.name}")
        self.path, self.backend, self.options = path, backend, options
        self._inputs = {t.name: t for t in inputs}
        self._outputs = {t.name: t for t in outputs}
        self.session = None

    def input_metadata(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    def output_metadata(self) -> dict[str, TensorSpec]:
        return dict(self._outputs)

    def activate_impl(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.path), self.backend.session_options(),
                                            providers=self.backend.providers(list(self._inputs.values()), self.options))

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(t.is_cuda for t in feed.values()):
            return self._infer_bound(feed)
        arrays = {name: np.ascontiguousarray(t.detach().numpy()) for name, t in feed.items()}
        results = self.session.run(list(self._outputs), arrays)
        return {name: torch.from_numpy(array) for name, array in zip(self._outputs, results)}

    def _infer_bound(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IOBinding on device memory: inputs and outputs stay on the GPU."""
        binding = self.session.io_binding()
        batch = next(iter(feed.values())).shape[0]
        device = next(iter(feed.values())).device
        for name, tensor in feed.items():
            tensor = tensor.contiguous()
            binding.bind_input(name, "cuda", device.index or 0, np.float32, list(tensor.shape), tensor.data_ptr())
        outputs = {}
        for name, spec in self._outputs.items():
            out = torch.empty(spec.concrete(batch), dtype=torch.float32, device=device)
            binding.bind_output(name, "cuda", device.index or 0, np.float32, list(out.shape), out.data_ptr())
            outputs[name] = out
        self.session.run_with_iobinding(binding)
        return outputs
