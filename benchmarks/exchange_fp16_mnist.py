"""fp16 vs fp32 exchange on the shared MNIST ViT, through real 2-rank GLOO groups on this host.

For prism (CR 5) and Voltage, every test image runs through a 2-rank group exchanging in fp32 and
through one exchanging in fp16 (rank 0 in this process, the worker a `prism-trt run` process);
reports the accuracy of each, how many answers differ, and the fp16 logits' largest difference from
the fp32 ones with the share of the fp32 and fp16 tolerances it uses (prism_trt.core.precision).

    cd benchmarks && python exchange_fp16_mnist.py [--limit N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import write_result

from prism_trt.core.precision import compare
from prism_trt.data import MnistTestSet, data_dir
from prism_trt.engines import BuildOptions, get_backend
from prism_trt.export.build import Builder, config_plans
from prism_trt.model import from_mnist_checkpoint
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.options import ExchangeDtype

BATCH, CR, TIMEOUT_S = 16, 5.0, 60.0


def build(root: Path, mnist: Path) -> None:
    model = from_mnist_checkpoint(mnist / "vit_mnist.pt")
    spec = model.spec
    Builder(model, {"checkpoint": "vit_mnist.pt"}, get_backend("onnxruntime", threads=1),
            BuildOptions(max_batch=BATCH), exporter="torchscript").build(
        root, 2, config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [CR], []), progress=False)


def run_group(engines: Path, mnist: Path, dtype: ExchangeDtype, limit: int | None) -> dict[str, tuple]:
    """{mode: (logits of every image, labels)} through one 2-rank group exchanging in ``dtype``."""
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", "1",
                               "--world-size", "2", "--master-port", str(port), "--threads", "1", "--timeout",
                               str(TIMEOUT_S), "--exchange-dtype", str(dtype)])
    executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S),
                                   RuntimeOptions(threads=1, exchange_dtype=dtype))
    out = {}
    try:
        for mode, cr in (("prism", CR), ("voltage", None)):
            key, logits, labels = executor.key_for(mode, cr), [], []
            for images, batch_labels in MnistTestSet(mnist, limit=limit).batches(BATCH):
                result = executor.infer(executor.request(images), key)
                assert not result.fell_back, "a batch fell back to the local chain"
                logits.append(result.logits)
                labels.append(batch_labels)
            out[mode] = (torch.cat(logits), torch.cat(labels))
    finally:
        executor.close()
        worker.wait(timeout=120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default: all 10,000)")
    args = parser.parse_args()
    mnist = data_dir() / "mnist"
    if not (mnist / "vit_mnist.pt").is_file():
        print(f"shared MNIST data not found at {mnist}: skipped")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(tmp)
        build(engines, mnist)
        fp32 = run_group(engines, mnist, ExchangeDtype.FP32, args.limit)
        fp16 = run_group(engines, mnist, ExchangeDtype.FP16, args.limit)
    for mode in fp32:
        (want, labels), (got, _) = fp32[mode], fp16[mode]
        tolerance = {p: compare(got, want, p, f"{mode} logits") for p in ("fp32", "fp16")}
        rows.append({"mode": mode, "images": len(labels),
                     "correct_fp32_exchange": int((want.argmax(-1) == labels).sum()),
                     "correct_fp16_exchange": int((got.argmax(-1) == labels).sum()),
                     "answers_differ": int((want.argmax(-1) != got.argmax(-1)).sum()),
                     "max_abs_logit_diff": tolerance["fp16"].max_abs_error,
                     "share_of_fp32_tolerance": tolerance["fp32"].used,
                     "share_of_fp16_tolerance": tolerance["fp16"].used})
        print(rows[-1])
    path = write_result("exchange_fp16_mnist", {"cr": CR, "batch": BATCH, "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
