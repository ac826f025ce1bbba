"""Sequence buckets: a text build of several sequence lengths, served as one model.

A plan partitions one sequence length N, so one engine set serves one N and shorter requests are
right-padded to it (exact: padding never changes a real position's output, only costs compute).
``prism-trt build --seq-len 32,128`` builds one engine set per length so that short requests do
not pay for the longest. The longest is the rank directory itself, as for one length, and its
manifest lists the shorter ones (``sequence_buckets``); each shorter one is a complete engine
directory of its own in ``seqN/`` (its manifest, chains, verification reports and digests)::

    OUT/rank0/manifest.json      N = 128, "sequence_buckets": [32]
    OUT/rank0/seq32/manifest.json  N = 32

A request of n positions runs on the smallest bucket with N >= n. Chains correspond across
buckets by build order: one build asks every bucket for the same chains in the same order (and
refuses CRs that would give the same L in a short bucket), so the chain a user or selector picks
by the longest bucket's key (``--mode prism --cr 8``) runs as the chain built from the same request
in a shorter one. :class:`BucketSet` is the one reader of that layout; it pairs the chains once,
as ``(bucket length, key)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.chain_key import ChainKey
from ..errors import UsageError
from .manifest import ChainConfig, Manifest, ManifestError

BUCKET_PREFIX = "seq"


def shortest_holding(lengths: tuple[int, ...], positions: int) -> int:
    """The position in ``lengths`` (ascending) of the shortest length >= ``positions``; a UsageError
    when none holds it. The one rule by which a request is given its bucket."""
    index = bisect.bisect_left(lengths, positions)
    if index == len(lengths):
        raise UsageError(f"{positions} positions are more than these engines were built for (longest sequence "
                         f"{lengths[-1]}; prism-trt build --seq-len)")
    return index


def bucket_directory(rank_dir: Path, length: int) -> Path:
    """Where a shorter bucket's engines lie inside a rank directory."""
    return Path(rank_dir) / f"{BUCKET_PREFIX}{length}"


@dataclass(frozen=True)
class Bucket:
    """One engine set: its sequence length N (None for a ViT), directory and manifest."""

    length: int | None
    directory: Path
    manifest: Manifest


class BucketSet:
    """Every engine set of one rank directory, shortest first; the last is the rank directory's own."""

    def __init__(self, buckets: list[Bucket]):
        if not buckets:
            raise ValueError("a bucket set needs at least the rank directory's own engines")
        self.buckets = sorted(buckets, key=lambda b: b.length or 0)
        primary = self.primary.manifest.configs
        #: (bucket length, the longest bucket's key) -> that bucket's chain, shortest bucket first, each
        #: in build order: the build gives every bucket the same chains in the same order
        self.chains: dict[tuple[int | None, ChainKey], tuple[Bucket, ChainConfig]] = {}
        for bucket in self.buckets:  # read() has checked that every bucket holds the same chains
            pairs = zip(primary, bucket.manifest.configs, strict=True)
            self.chains.update({(bucket.length, ours.key): (bucket, theirs) for ours, theirs in pairs})

    @classmethod
    def read(cls, rank_dir: Path, primary: Manifest, backend: str | None = None, device: str | None = None,
             verify: bool = True) -> BucketSet:
        """The rank directory's buckets: ``primary`` (its manifest, already checked) and each shorter
        one it lists, loaded (files hashed with ``verify``) and checked to be of the same build."""
        own = Bucket(primary.model.sequence_length, Path(rank_dir), primary)
        buckets = [own]
        for length in primary.sequence_buckets:
            directory = bucket_directory(rank_dir, length)
            manifest = Manifest.load(directory, backend, device, verify)
            _require_same_build(primary, manifest, directory, length)
            buckets.append(Bucket(length, directory, manifest))
        return cls(buckets)

    # -- what it holds ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def primary(self) -> Bucket:
        """The longest bucket: the rank directory's own manifest, whose keys users and selectors name."""
        return self.buckets[-1]

    @property
    def lengths(self) -> tuple[int, ...]:
        """The sequence lengths, ascending; () for a ViT build."""
        return tuple(b.length for b in self.buckets if b.length is not None)

    def for_length(self, positions: int) -> Bucket:
        """The smallest bucket that holds ``positions``; a UsageError beyond the longest."""
        lengths = self.lengths
        if not lengths:
            return self.primary
        return self.buckets[shortest_holding(lengths, positions)]

    def chain(self, key: ChainKey, bucket: Bucket) -> ChainConfig:
        """The chain, in ``bucket``, that the longest bucket knows as ``key``; a ManifestError naming
        the chains that were built when there is none."""
        found = self.chains.get((bucket.length, key))
        if found is None:
            self.primary.manifest.config(key)  # raises, naming what was built
            raise ManifestError(f"{bucket.directory}: no {key.label} engines")
        return found[1]


def _require_same_build(primary: Manifest, other: Manifest, directory: Path, length: int) -> None:
    """A shorter bucket must hold the same model, rank, backend and chains (by mode, in order)."""
    checks = {
        "sequence length": (other.model.sequence_length, length),
        "rank": ((other.rank, other.world_size), (primary.rank, primary.world_size)),
        "weights": (other.model.weights_sha256, primary.model.weights_sha256),
        "backend": (other.backend, primary.backend),
        "build options": (other.build_options.to_dict() | {"timing_cache": None},
                          primary.build_options.to_dict() | {"timing_cache": None}),
        "means source": (other.means_source, primary.means_source),
        "chains": ([c.mode for c in other.configs], [c.mode for c in primary.configs]),
    }
    for what, (found, expected) in checks.items():
        if found != expected:
            raise ManifestError(f"{directory}: its {what} ({found}) differs from {primary.model.sequence_length}-"
                                f"position engines' ({expected}) beside it; rebuild every --seq-len with one "
                                f"`prism-trt build`")
