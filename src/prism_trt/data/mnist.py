"""A streaming reader for the MNIST idx files (``t10k-*-ubyte.gz``); nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingFileError, PrismError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}
DATA_ENV = "PRISM_TRT_DATA"


def data_dir() -> Path:
    """Shared data root: $PRISM_TRT_DATA, else ../shared/data beside the checkout."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[4] / "shared" / "data"


class IdxFormatError(PrismError, ValueError):
    """A file that is not a valid idx file."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(stream, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = stream.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise IdxFormatError(f"{path}: not an idx file (magic {magic.hex()})")
    ndim = magic[3]
    dims = struct.unpack(f">{ndim}I", stream.read(4 * ndim))
    return np.dtype(IDX_DTYPES[magic[2]]), dims


def read_idx(path: str | Path) -> np.ndarray:
    """The whole array stored in an idx(.gz) file."""
    path = Path(path)
    with _open(path) as stream:
        dtype, dims = read_idx_header(stream, path)
        data = stream.read()
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise IdxFormatError(f"{path}: header promises {expected} bytes of data, file has {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


class MnistTestSet:
    """The 10k MNIST test images, streamed in normalised float32 batches (B, 1, 28, 28), or as their
    uint8 pixels."""

    IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"

    def __init__(self, root: str | Path, mean: float = 0.1307, std: float = 0.3081, limit: int | None = None):
        root = Path(root)
        self.images_path, self.labels_path = root / self.IMAGES, root / self.LABELS
        missing = [str(p) for p in (self.images_path, self.labels_path) if not p.is_file()]
        if missing:
            raise MissingFileError(f"MNIST test set not found: {', '.join(missing)} (set {DATA_ENV} or --data)")
        self.labels = read_idx(self.labels_path).astype(np.int64)
        self.mean, self.std = mean, std
        self.count = len(self.labels) if limit is None else min(limit, len(self.labels))

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int, raw: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Reads images lazily from the gzip stream, ``batch_size`` at a time: normalised float32, or
        (``raw``) the uint8 pixels as stored, which a served model takes as they are."""
        with _open(self.images_path) as stream:
            _, dims = read_idx_header(stream, self.images_path)
            if len(dims) != 3 or dims[0] != len(self.labels):
                raise IdxFormatError(f"{self.images_path}: shape {dims} does not match {len(self.labels)} labels")
            h, w = dims[1], dims[2]
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = stream.read(n * h * w)
                if len(data) != n * h * w:
                    raise IdxFormatError(f"{self.images_path}: truncated at image {start}")
                pixels = np.frombuffer(data, dtype=np.uint8).reshape(n, 1, h, w)
                labels = torch.from_numpy(self.labels[start:start + n])
                if raw:
                    yield torch.from_numpy(pixels.copy()), labels
                else:
                    yield torch.from_numpy((pixels.astype(np.float32) / 255.0 - self.mean) / self.std), labels
