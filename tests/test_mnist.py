"""Accuracy on the real pretrained MNIST ViT (prism.md section 9)."""

import gzip
import json
import subprocess
import sys

import pytest
import torch

from prism_trt.core import make_partition_plan, voltage_plan
from prism_trt.core.accuracy import evaluate
from prism_trt.data import MnistTestSet
from prism_trt.data.mnist import IdxFormatError, read_idx


def test_unpartitioned_full_test_set(mnist_model, mnist_dir):
    dataset = MnistTestSet(mnist_dir)
    assert len(dataset) == 10000
    correct = 0
    with torch.no_grad():
        for images, labels in dataset.batches(1000):
            correct += int((mnist_model(images).argmax(-1) == labels).sum())
    assert correct == 9721


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_cr1_agrees_on_subset(mnist_model, mnist_dir, ranks):
    dataset = MnistTestSet(mnist_dir, limit=1500)
    plan = voltage_plan(make_partition_plan(50, 1, ranks))
    [ln1, inp] = evaluate(mnist_model, dataset.batches(500), [plan], ["ln1", "input"], progress=False)
    assert ln1.agree == inp.agree == ln1.total == 1500
    assert ln1.correct == ln1.reference_correct


def test_p2_cr1_full_test_set(mnist_model, mnist_dir):
    plan = voltage_plan(make_partition_plan(50, 1, 2))
    [result] = evaluate(mnist_model, MnistTestSet(mnist_dir).batches(1000), [plan], ["ln1"], progress=False)
    assert (result.correct, result.total, result.agree) == (9721, 10000, 10000)


def test_accuracy_cli_json(mnist_dir):
    out = subprocess.run([sys.executable, "-m", "prism_trt.cli", "accuracy", "--checkpoint",
                          str(mnist_dir / "vit_mnist.pt"), "--data", str(mnist_dir), "--ranks", "2", "--segments", "25",
                          "--segments", "3", "--limit", "300", "--json"], capture_output=True, text=True, timeout=300,
                         check=True)
    lossless, compressed = json.loads(out.stdout)
    assert lossless["cr"] == 1.0 and lossless["agree"] == 300 and lossless["correct"] == lossless["reference_correct"]
    assert compressed["segments"] == 3 and compressed["agree"] < 300


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x03\x04junk")
    with pytest.raises(IdxFormatError, match="not an idx file"):
        read_idx(bad)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(IdxFormatError, match="promises 10 bytes"):
        read_idx(truncated)
    with pytest.raises(FileNotFoundError, match="MNIST test set not found"):
        MnistTestSet(tmp_path)
