"""fp16 engines and the exchange: on the CPU, the default exchange dtype of an fp16 build is fp16
(half the bytes, answers unchanged); on a GPU, fp16 CUDA-EP engines on two ranks sharing it,
exchanging in fp16 through each staging kind, classify MNIST within 10 images of 9721 (skips
without a GPU). A module of its own: the fp16-exchange module keeps a group open in its process."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines
from test_distributed import TIMEOUT_S, finish, start_workers
from test_exchange_dtype import in_process

from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.chain import run_chains_in_process
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.options import ExchangeDtype, StagingKind
from prism_trt.runtime.request import InferenceRequest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fp16_engines(mnist_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16-engines")
    build_engines(mnist_model, root, 2, [5.0], source={"checkpoint": "vit_mnist.pt"}, max_batch=16,
                  precision="fp16")
    return root


def test_fp16_engines_exchange_in_fp16_without_loss(mnist_dir, fp16_engines):
    """fp16 engines: the default exchange dtype is fp16, so the staged, sent bytes halve; the
    logits stay within the fp16 tolerance of an fp32 exchange's, with the same answers. (Not bit
    for bit on the CPU EP: it computes nodes without fp16 kernels in fp32 and drops the cast pairs
    around them, so some outputs are not fp16 values.)"""
    from prism_trt.data import MnistTestSet

    images, _ = next(MnistTestSet(mnist_dir, limit=10).batches(10))
    port = free_port()
    workers = start_workers(fp16_engines, 2, port)  # no flag: auto on both ranks
    executor = DistributedExecutor(fp16_engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S),
                                   ONE_THREAD)
    try:
        assert executor.rank.exchange_dtype is ExchangeDtype.FP16
        for mode, cr in (("prism", 5.0), ("voltage", None)):
            result = executor.infer(executor.request(images), executor.key_for(mode, cr), gather_timings=True)
            route = executor.rank.routes[executor.rank.route_of[None, executor.key_for(mode, cr)]]
            assert route.staging.itemsize == 2
            assert result.per_rank[1].bytes_sent == 6 * 10 * route.config.plan.counts[1] * 64 * 2
            chains = in_process(fp16_engines, mode, cr)
            want = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))
            for chain in chains:
                chain.__exit__(None, None, None)
            assert_close(result.logits, want, "fp16", name=f"{mode} logits of fp16 engines, fp16 vs fp32 exchange")
            assert torch.equal(result.logits.argmax(-1), want.argmax(-1))
    finally:
        executor.close()
        for code, out in finish(workers):
            assert code == 0, out


HAS_ORT_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(not HAS_ORT_CUDA, reason="needs a CUDA device and onnxruntime-gpu (pip install .[gpu])")
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("staging", ["torch", "pycuda"])
def test_fp16_engines_on_the_gpu_two_ranks_mnist(mnist_model, mnist_dir, tmp_path, staging):
    """fp16 CUDA-EP engines end to end on one GPU, two ranks exchanging in fp16 through each staging
    kind: the full MNIST test set within 10 images of the fp32 result (9721/10000)."""
    if staging == "pycuda":
        pytest.importorskip("pycuda.driver", reason="the pycuda staging needs pycuda")
    from prism_trt.data import MnistTestSet
    from prism_trt.engines import get_backend

    build_engines(mnist_model, tmp_path, 2, [5.0], source={"checkpoint": "vit_mnist.pt"}, max_batch=16,
                  backend=get_backend("onnxruntime", provider="cuda"), precision="fp16")
    port = free_port()
    workers = start_workers(tmp_path, 2, port, extra=("--device", "cuda:0", "--staging", staging))
    options = RuntimeOptions(threads=1, device="cuda:0", staging=StagingKind(staging))
    executor = DistributedExecutor(tmp_path / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S), options)
    try:
        key = executor.key_for("prism", 5.0)
        assert executor.rank.routes[executor.rank.route_of[None, key]].staging.name == \
            {"torch": "torch-cuda", "pycuda": "pycuda"}[staging]
        correct = 0
        for images, labels in MnistTestSet(mnist_dir).batches(16):
            result = executor.infer(executor.request(images), key)
            assert not result.fell_back
            correct += int((result.logits.argmax(-1).cpu() == labels).sum())
    finally:
        executor.close()
        for code, out in finish(workers):
            assert code == 0, out
    assert abs(correct - 9721) <= 10, correct


def test_gpt2_final_gather_in_fp16(text_engines):
    """GPT-2's per-position head: rank 1's final hidden states reach rank 0 in fp16 too (half the
    bytes), and the logits stay within the fp16 tolerance of the fp32 reference."""
    pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")
    from conftest import text_request
    from test_text_export import reference

    from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS

    directory, model = text_engines("gpt2")
    port = free_port()
    workers = start_workers(directory, 2, port, extra=("--exchange-dtype", "fp16"))
    executor = DistributedExecutor(directory / "rank0", GroupConfig(0, 2, "127.0.0.1", port, TIMEOUT_S),
                                   RuntimeOptions(threads=1, exchange_dtype=ExchangeDtype.FP16))
    try:
        ids, mask = text_request(1, 7, (16,))
        result = executor.infer(executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask}),
                                executor.key_for("prism", 2.0), True)
        assert_close(result.logits, reference(model, "prism", 4, ids, mask), "fp16", name="gpt2 prism, fp16 exchange")
        sent = [times.bytes_sent for times in result.per_rank]
        assert sent[0] == 2 * 4 * 32 * 2 and sent[1] == 8 * 32 * 2  # means / hidden states, 2 bytes each
    finally:
        executor.close()
        for code, out in finish(workers):
            assert code == 0, out
