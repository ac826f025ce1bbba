"""Agreement of each Prism plan with the local model on a calibration set, recorded in the map so
the selector never trades more accuracy than allowed. The bundled MNIST checkpoint calibrates on
the real MNIST test images (with labels: accuracy too); random-weight timm models on random
inputs, which gives agreement only and is said so."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.accuracy import evaluate
from ..core.plan import PartitionPlan, make_segment_plan
from ..data import MnistTestSet, data_dir
from ..engines.manifest import Manifest, rank_directory
from ..engines.perfmap import AccuracyEntry
from ..model import load_model


def model_from_manifest(engines: Path):
    manifest = Manifest.read(rank_directory(engines))
    source = manifest.model.source
    model = load_model(source.get("timm"), source.get("checkpoint"))
    return model, manifest


def calibrate(engines: Path, calib_data: Path | None = None, samples: int = 1000, progress: bool = False
              ) -> list[AccuracyEntry]:
    """One entry per built prism / voltage chain: its agreement with the local model (and accuracy
    where the calibration set has labels)."""
    model, manifest = model_from_manifest(engines)
    spec = model.spec
    configs = [c for c in manifest.configs if c.mode in ("prism", "voltage")]
    # each chain's own partition: a weighted build's ranks hold unequal shares
    plans = [make_segment_plan(PartitionPlan(spec.num_tokens, spec.num_prefix_tokens, c.partition), segments=c.segments)
             for c in configs]
    source = manifest.means_source
    mnist_root = calib_data or data_dir() / "mnist"
    if "checkpoint" in manifest.model.source and (mnist_root / MnistTestSet.IMAGES).is_file():
        dataset = MnistTestSet(mnist_root, spec.mean[0], spec.std[0], limit=samples)
        batches, label, labelled = dataset.batches(250), f"mnist:{len(dataset)} images", True
    else:
        generator = torch.Generator().manual_seed(0)
        count = min(samples, 256)
        images = torch.randn((count, spec.in_chans, *spec.img_size), generator=generator)
        batches = [(images[i:i + 32], torch.full((len(images[i:i + 32]),), -1)) for i in range(0, count, 32)]
        label, labelled = f"random:{count} inputs (random weights: agreement only, no accuracy)", False
    results = evaluate(model, batches, plans, [source], progress=progress)
    return [AccuracyEntry(c.key, r.ranks, r.agreement, r.accuracy if labelled else None,
                          (r.reference_correct / r.total) if labelled else None, label)
            for r, c in zip(results, configs)]
