"""Data sources: the MNIST idx reader and where shared data lives."""

from .mnist import MnistTestSet, data_dir, read_idx

__all__ = ["MnistTestSet", "data_dir", "read_idx"]
