from .runner import TorchRunner

__all__ = ["TorchRunner"]
