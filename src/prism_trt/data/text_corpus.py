"""The bundled byte-level text: held-out Python docstrings for the tiny GPT-2 (``gpt2-pydoc``),
and the fixed windows every text-accuracy figure is measured on. Nothing is downloaded.

The corpus is the docstrings of CPython's standard library (PSF licence), extracted once by
``scripts/train_tiny_gpt2.py`` and committed gzip-compressed beside the checkpoint, so what is
evaluated never depends on the Python version that evaluates it (``sha256`` in ``meta.json``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MissingFileError, PrismError

#: Where the checkpoint, its corpus and its provenance live (installed as package data).
TINY_GPT2_DIR = Path(__file__).resolve().parent / "tiny_gpt2"
HELDOUT_FILE, TRAIN_FILE, META_FILE, CHECKPOINT_FILE = "heldout.txt.gz", "train.txt.gz", "meta.json", "gpt2-pydoc.pt"
#: Target of a position that has no next token (padding): skipped by every count.
IGNORE = -100


class CorpusIntegrityError(PrismError, ValueError):
    """A bundled corpus file whose bytes do not match the SHA-256 recorded in meta.json."""


def read_meta(root: Path = TINY_GPT2_DIR) -> dict:
    path = root / META_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found: the tiny GPT-2 was not installed with the package "
                               "(reinstall prism-trt, or run scripts/train_tiny_gpt2.py)")
    return json.loads(path.read_text())


def read_corpus(name: str = HELDOUT_FILE, root: Path = TINY_GPT2_DIR, verify: bool = True) -> bytes:
    """The (uncompressed) bytes of a bundled corpus file, checked against meta.json's SHA-256."""
    path = root / name
    if not path.is_file():
        raise MissingFileError(f"{path} not found (reinstall prism-trt, or run scripts/train_tiny_gpt2.py)")
    data = gzip.decompress(path.read_bytes())
    if verify:
        expected = read_meta(root)["corpus"]["files"][name]["sha256"]
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CorpusIntegrityError(f"{path}: SHA-256 {actual} but meta.json records {expected}")
    return data


@dataclass(frozen=True)
class TextWindows:
    """A byte string cut into fixed, non-overlapping windows of ``seq_len`` positions.

    Window ``w`` reads bytes ``[w*seq_len, (w+1)*seq_len)`` and predicts each one's successor, so
    every byte but the first is a target exactly once. The last window is right-padded (mask 0,
    target :data:`IGNORE`); so is the last position of a window when the text ends there.
    """

    data: bytes
    seq_len: int
    limit: int | None = None  # at most this many windows (the first ones)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise PrismError(f"seq_len must be >= 1, got {self.seq_len}")
        if len(self.data) < 2:
            raise PrismError("the text needs at least 2 bytes (one input and its next byte)")

    def __len__(self) -> int:
        windows = -(-(len(self.data) - 1) // self.seq_len)  # every byte but the last is an input
        return windows if self.limit is None else min(self.limit, windows)

    @property
    def targets(self) -> int:
        """Positions that have a next byte (the denominator of next-token accuracy)."""
        return min(len(self.data) - 1, len(self) * self.seq_len)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask, targets), each (B, seq_len) int64, in window order."""
        source = torch.frombuffer(bytearray(self.data), dtype=torch.uint8).long()
        for first in range(0, len(self), batch_size):
            count = min(batch_size, len(self) - first)
            ids = torch.zeros(count, self.seq_len, dtype=torch.long)
            mask = torch.zeros_like(ids)
            targets = torch.full_like(ids, IGNORE)
            for row in range(count):
                start = (first + row) * self.seq_len
                inputs = source[start:start + self.seq_len]
                nexts = source[start + 1:start + self.seq_len + 1]
                ids[row, :len(inputs)], mask[row, :len(inputs)] = inputs, 1
                targets[row, :len(nexts)] = nexts
            yield ids, mask, targets
