"""The torch reference backend: runs a stage module eagerly (the maths every engine must match)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..base import Runner, TensorSpec


class TorchRunner(Runner):
    """Eager torch on the stage module itself; ``device`` "cpu" or "cuda[:N]"."""

    def __init__(self, name: str, module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 device: str = "cpu"):
        super().__init__(f"torch:{name}", inputs, outputs)
        self.module, self.device = module, torch.device(device)

    def activate_impl(self) -> None:
        self.module = self.module.to(self.device).eval()

    def deactivate_impl(self) -> None:
        pass

    @torch.no_grad()
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = self.module(*(feed[name].to(self.device) for name in self._inputs))
        result = result if isinstance(result, tuple) else (result,)
        return dict(zip(self._outputs, result))
