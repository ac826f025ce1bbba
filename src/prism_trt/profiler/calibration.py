"""Agreement of each Prism plan with the local model on a calibration set, recorded in the map so
the selector never trades more accuracy than allowed. The bundled MNIST checkpoint calibrates on
the real MNIST test images (with labels: accuracy too), the bundled trained text model
(``gpt2-pydoc``) on its held-out text (next-token accuracy too); random-weight models (timm ViTs,
BERT / GPT-2 configs) on random inputs, which gives agreement only and is said so.

For a text model, agreement is per prediction: per valid position for a language model (argmax
of the next-token logits), per sequence for a classifier; rank 0's exact positions count too, as
in ``prism-trt accuracy``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.accuracy import evaluate
from ..core.chain_key import Mode
from ..core.text_accuracy import evaluate_text
from ..data import MnistTestSet, data_dir
from ..data.text_corpus import HELDOUT_FILE, TextWindows, read_corpus
from ..engines.manifest import ChainConfig, Manifest, ModelRecord, rank_directory
from ..engines.modality import Text, Vision
from ..engines.perfmap import AccuracyEntry
from ..model import CheckpointMismatchError, load_model, weights_hash
from ..model.text_adapters import PRETRAINED_TEXT, load_text_model

#: Random calibration inputs when a model has no real data: at most this many images / sequences.
RANDOM_SAMPLES = 256


def model_from_manifest(engines: Path):
    """The model a build was made from, rebuilt from its source record and checked against the
    weights digest the build recorded (calibrating other weights would calibrate another model)."""
    manifest = Manifest.read(rank_directory(engines))
    return _LOADERS[manifest.model.kind](engines, manifest.model), manifest


def _load_vit(engines: Path, record: ModelRecord):
    return load_model(record.source.get("timm"), record.source.get("checkpoint"))


def _load_text(engines: Path, record: ModelRecord):
    source = record.source
    model = load_text_model(source["text"], seed=source.get("seed", 0), **source.get("config", {}))
    if weights_hash(model) != record.weights_sha256:
        raise CheckpointMismatchError(
            f"{engines}: {source['text']} rebuilt here has other weights than the build recorded "
            f"({record.weights_sha256[:12]}...): rebuild the engines with this prism-trt / transformers")
    return model


def calibrate(engines: Path, calib_data: Path | None = None, samples: int = 1000, progress: bool = False
              ) -> list[AccuracyEntry]:
    """One entry per built prism / voltage chain: its agreement with the local model (and accuracy
    where the calibration set has labels). ``samples``: images, or text windows of the build's N."""
    model, manifest = model_from_manifest(engines)
    return calibrate_chains(model, manifest.model, manifest.configs, manifest.means_source, calib_data, samples,
                            progress)


def calibrate_chains(model, record: ModelRecord, configs: list[ChainConfig], means_source: str,
                     calib_data: Path | None = None, samples: int = 1000, progress: bool = False
                     ) -> list[AccuracyEntry]:
    """:func:`calibrate` for a model, its manifest record and chains already in hand."""
    configs = [c for c in configs if c.mode in (Mode.PRISM, Mode.VOLTAGE)]
    plans = [c.plan for c in configs]  # each chain's own: a weighted build's ranks hold unequal shares
    calibrate_family = _CALIBRATIONS[record.kind]
    results, label, labelled = calibrate_family(model, record, plans, means_source, calib_data, samples, progress)
    return [AccuracyEntry(c.key, r.ranks, r.agreement, r.accuracy if labelled else None,
                          (r.reference_correct / r.total) if labelled else None, label)
            for r, c in zip(results, configs)]


def _calibrate_vit(model, record: ModelRecord, plans, source, calib_data, samples, progress):
    spec = model.spec
    mnist_root = calib_data or data_dir() / "mnist"
    if "checkpoint" in record.source and (mnist_root / MnistTestSet.IMAGES).is_file():
        dataset = MnistTestSet(mnist_root, spec.mean[0], spec.std[0], limit=samples)
        batches, label, labelled = dataset.batches(250), f"mnist:{len(dataset)} images", True
    else:
        generator = torch.Generator().manual_seed(0)
        count = min(samples, RANDOM_SAMPLES)
        images = torch.randn((count, spec.in_chans, *spec.img_size), generator=generator)
        batches = [(images[i:i + 32], torch.full((len(images[i:i + 32]),), -1)) for i in range(0, count, 32)]
        label, labelled = f"random:{count} inputs (random weights: agreement only, no accuracy)", False
    return evaluate(model, batches, plans, [source], progress=progress), label, labelled


def _calibrate_text(model, record: ModelRecord, plans, source, calib_data, samples, progress):
    """calib_data is for image sets: text calibrates on the bundled held-out corpus (or random ids)."""
    seq_len = record.sequence_length
    name = record.source.get("text")
    if name in PRETRAINED_TEXT and model.spec.head == "lm":
        windows = TextWindows(read_corpus(HELDOUT_FILE), seq_len, limit=samples)
        batches = windows.batches(64)
        label, labelled = f"text:{name} held-out, {len(windows)} windows of {seq_len} bytes (next-token)", True
    else:
        generator = torch.Generator().manual_seed(0)
        count = min(samples, RANDOM_SAMPLES)
        ids = torch.randint(0, model.spec.vocab_size, (count, seq_len), generator=generator)
        batches = [(ids[i:i + 32], torch.ones_like(ids[i:i + 32]), None) for i in range(0, count, 32)]
        label, labelled = f"random:{count} sequences (random weights: agreement only, no accuracy)", False
    return evaluate_text(model, batches, plans, [source], progress=progress), label, labelled


#: How each modality's model is rebuilt from its record, and calibrated, by its kind.
_LOADERS = {Vision.kind: _load_vit, Text.kind: _load_text}
_CALIBRATIONS = {Vision.kind: _calibrate_vit, Text.kind: _calibrate_text}
