"""fp16 exchange through real 2-rank GLOO groups on the CPU: the means and Voltage features are
staged and sent in fp16 (half the bytes, counted at their real element size), the logits agree
with the fp32 exchange under the fp16 tolerance and MNIST accuracy stays within a few images; a
rank that exchanges in another dtype than rank 0 is refused when the group forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines
from test_distributed import TIMEOUT_S, finish, start_workers

from prism_trt.engines import ChainKey
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.chain import load_chain, run_chains_in_process
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.options import ExchangeDtype
from prism_trt.runtime.request import InferenceRequest

pytestmark = pytest.mark.timeout(300)
FP16 = RuntimeOptions(threads=1, exchange_dtype=ExchangeDtype.FP16)
SUBSET = 480  # MNIST test images run through the fp16 group (the full set is the docs' figure)


@pytest.fixture(scope="module")
def engines(mnist_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("exchange")
    build_engines(mnist_model, root, 2, [5.0], source={"checkpoint": "vit_mnist.pt"}, max_batch=16)
    return root


@pytest.fixture(scope="module")
def fp16_cluster(engines):
    """Rank 0 in this process and one `prism-trt run --exchange-dtype fp16` worker."""
    port = free_port()
    workers = start_workers(engines, 2, port, extra=("--exchange-dtype", "fp16"))
    executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S), FP16)
    yield executor
    executor.close()
    for code, out in finish(workers):
        assert code == 0, out


def in_process(engines, mode: str, cr: float | None) -> list:
    """Both ranks' chains in this process, exchanging in fp32 (lists, no staging): the reference."""
    return [load_chain(engines / f"rank{rank}", mode, cr, ONE_THREAD).__enter__() for rank in range(2)]


def test_fp16_exchange_halves_bytes_and_agrees(mnist_model, mnist_dir, fp16_cluster, engines):
    from prism_trt.data import MnistTestSet

    images, _ = next(MnistTestSet(mnist_dir, limit=12).batches(12))
    depth, dim = mnist_model.spec.depth, mnist_model.spec.embed_dim
    for mode, cr in (("prism", 5.0), ("voltage", None)):
        key = fp16_cluster.key_for(mode, cr)
        result = fp16_cluster.infer(fp16_cluster.request(images), key, gather_timings=True)
        assert not result.fell_back
        counts = fp16_cluster.rank.routes[fp16_cluster.rank.route_of[None, key]].config.plan.counts
        for rank, times in enumerate(result.per_rank):  # 2 bytes an element: half the fp32 figure
            assert times.bytes_sent == depth * 12 * counts[rank] * dim * 2
            assert times.bytes_received == depth * 12 * counts[1 - rank] * dim * 2
        chains = in_process(engines, mode, cr)
        want = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))
        comparison = assert_close(result.logits, want, "fp16", name=f"{mode} logits, fp16 vs fp32 exchange")
        assert comparison.max_abs_error > 0  # the fp16 exchange really rounded something
        for chain in chains:
            chain.__exit__(None, None, None)


def test_fp16_exchange_mnist_accuracy_subset(mnist_model, mnist_dir, fp16_cluster, engines):
    """The fp16 group classifies a subset of the test set like the fp32 exchange, within 2 images."""
    from prism_trt.data import MnistTestSet

    chains = in_process(engines, "prism", 5.0)
    key = fp16_cluster.key_for("prism", 5.0)
    fp16_correct = fp32_correct = 0
    for images, labels in MnistTestSet(mnist_dir, limit=SUBSET).batches(16):
        fp16_correct += int((fp16_cluster.infer(fp16_cluster.request(images), key).logits.argmax(-1) == labels).sum())
        want = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))
        fp32_correct += int((want.argmax(-1) == labels).sum())
    for chain in chains:
        chain.__exit__(None, None, None)
    assert abs(fp16_correct - fp32_correct) <= 2, (fp16_correct, fp32_correct)


def test_a_rank_with_another_exchange_dtype_is_refused(engines):
    """Rank 0 exchanges in fp16, the worker in fp32: both refuse at the join, naming the flag (rank
    0 as a `prism-trt run` process too: this process may already hold a group)."""
    port = free_port()
    workers = start_workers(engines, 2, port, extra=("--exchange-dtype", "fp32"))
    rank0 = subprocess.run([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", "0",
                            "--world-size", "2", "--master-port", str(port), "--threads", "1", "--timeout",
                            str(TIMEOUT_S), "--exchange-dtype", "fp16", "--mode", "voltage", "--repeat", "1",
                            "--warmup", "0"],
                           capture_output=True, text=True, timeout=120)
    (code, out), = finish(workers)
    assert rank0.returncode != 0 and code != 0
    for output in (rank0.stderr, out):
        assert "rank 1 exchanges features in fp32, rank 0 in fp16" in output and "--exchange-dtype" in output


def test_local_chain_is_unchanged_by_the_option(mnist_model, fp16_cluster):
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want = mnist_model(images)
    assert_close(fp16_cluster.infer(fp16_cluster.request(images), ChainKey.local()).logits, want)
