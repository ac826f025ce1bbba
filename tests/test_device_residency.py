"""The device-resident design, checked on the CPU: what crosses between host and device memory in
a distributed batch (a real two-rank GLOO group), where runners write their outputs, and that
local mode runs the monolithic engine.

A CPU rank's host memory is its device's, so nothing really moves here; but every crossing goes
through the rank's :class:`~prism_trt.runtime.transfers.DeviceTransfers`, which counts it all the
same, and the bypass guard of ``transfer_spy`` catches a moving call that goes around it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, assert_close, build_engines, random_model, small_spec
from transfer_spy import bypass_guard, request_bytes

from prism_trt.engines import BuildOptions, ChainKey, get_backend
from prism_trt.errors import UsageError
from prism_trt.runtime import RuntimeOptions, load_chain, run_chains_in_process
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.distributed_rank import DistributedRank
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.local import LocalExecutor
from prism_trt.runtime.request import InferenceRequest
from prism_trt.runtime.transfers import Crossing, DeviceTransfers

pytestmark = pytest.mark.timeout(240)
CR, BATCHES = 3.0, (2, 3, 2)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A small random ViT for two ranks: local (+ monolithic), voltage and prism CR 3 (max batch 8)."""
    root = tmp_path_factory.mktemp("residency")
    model = random_model(small_spec(img=32, depth=2))
    build_engines(model, root, 2, [CR], max_batch=8)
    return root, model


def expected_exchange_bytes(route, batch: int, depth: int) -> int:
    """Before each of the ``depth`` blocks, the staging's copy of this rank's means out and of the
    others' in (their sizes are the staging's: padded slots, in the exchange's element type)."""
    layout, itemsize = route.staging.layout, route.staging.itemsize
    return depth * (layout.d2h_bytes(batch, itemsize) + layout.h2d_bytes(batch, itemsize))


def test_only_the_request_the_exchange_and_the_logits_cross(engines, tmp_path, monkeypatch):
    """Per distributed batch, on both ranks: the rank's share of the request crosses once, the means around
    each all-gather, the logits once on rank 0, nothing else; no moving call bypasses the counter."""
    root, model = engines
    spec = model.spec
    port = free_port()
    report = tmp_path / "rank1.json"
    worker = subprocess.Popen([sys.executable, str(Path(__file__).with_name("transfer_spy.py")), str(root),
                               str(port), str(report)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    requested: list[int] = []
    original_run = DistributedRank.run

    def spied_run(self, config_index, request, *args, **kwargs):
        requested.append(request_bytes(request))
        return original_run(self, config_index, request, *args, **kwargs)

    monkeypatch.setattr(DistributedRank, "run", spied_run)
    executor = None
    bypasses: list[str] = []
    expected = {kind: 0 for kind in Crossing}
    worker_routes: list[tuple[str, int]] = []  # the worker reports its own staging's byte counts
    try:
        executor = DistributedExecutor(root / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 20.0), ONE_THREAD)
        transfers = executor.rank.transfers
        transfers.reset()
        for batch in BATCHES:
            for key in (executor.key_for("prism", CR), ChainKey.voltage()):
                request = executor.request(torch.randn(batch, 3, 32, 32))
                with bypass_guard(bypasses):
                    result = executor.infer(request, key)
                assert not result.fell_back
                route = executor.rank.routes[executor.rank.config_index(key, None)]
                expected[Crossing.EXCHANGE] += expected_exchange_bytes(route, batch, spec.depth)
                worker_routes.append((route.config.name, batch))
                expected[Crossing.LOGITS] += result.logits.numel() * 4
        runs = len(BATCHES) * 2
    finally:
        if executor is not None:
            executor.close()
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert bypasses == []
    expected[Crossing.REQUEST] = sum(requested)
    assert transfers.bytes == expected
    assert transfers.crossings == {Crossing.REQUEST: runs, Crossing.EXCHANGE: 2 * spec.depth * runs,
                                   Crossing.LOGITS: runs, Crossing.OTHER: 0}

    seen = json.loads(report.read_text())
    assert seen["bypasses"] == [] and seen["batches"] == runs
    assert seen["transfers"]["bytes"] == {"request": sum(seen["requested"]), "logits": 0, "other": 0,
                                          "exchange": sum(seen["exchange"][f"{name}/{batch}"]
                                                          for name, batch in worker_routes)}
    assert seen["transfers"]["crossings"] == {"request": runs, "exchange": 2 * spec.depth * runs, "logits": 0,
                                              "other": 0}


def test_the_bypass_guard_sees_a_stray_copy():
    """The guard itself can fail: a moving call from the package outside the boundary is found."""
    from prism_trt.runtime import chain

    found: list[str] = []
    with bypass_guard(found):
        exec(compile("torch.ones(2).cpu()", chain.__file__, "exec"), {"__name__": chain.__name__, "torch": torch})
        torch.ones(2).cpu()  # this test's own call is not the package's
        DeviceTransfers().to_host(torch.ones(2), Crossing.LOGITS)  # the boundary's is allowed
    assert found == [f"{chain.__name__}:1 Tensor.cpu"]


def test_local_mode_crosses_once_each_way_and_runs_the_monolithic_engine(engines):
    root, model = engines
    executor = LocalExecutor(root / "rank0", ONE_THREAD)
    try:
        chain = executor.chain_of[None]
        assert chain.is_monolithic and list(chain.stages) == ["model"]
        images = torch.randn(3, 3, 32, 32)
        found: list[str] = []
        with bypass_guard(found):
            got = executor.infer(executor.request(images), ChainKey.local()).logits
        assert found == []
        assert executor.transfers.crossings == {Crossing.REQUEST: 1, Crossing.EXCHANGE: 0, Crossing.LOGITS: 1,
                                                Crossing.OTHER: 0}
        with load_chain(root / "rank0", "local", options=ONE_THREAD) as stages:
            assert_close(got, run_chains_in_process([stages], InferenceRequest.of(stages.manifest.model, images)),
                         name="monolithic vs stage chain")
        with torch.no_grad():
            assert_close(got, model(images), name="monolithic vs reference")
    finally:
        executor.close()


def test_distributed_fallback_runs_the_monolithic_engine(engines):
    root, _ = engines
    rank = DistributedRank(root / "rank0", 0, 2, ONE_THREAD)
    try:
        assert rank.local_chain.is_monolithic
    finally:
        rank.close()


def test_runners_bind_outputs_on_the_chains_device(engines):
    """Placement through the CPU EP: every runner writes where the chain runs, its outputs bound
    there whatever the feed's device, and a device the backend cannot write is refused."""
    root, _ = engines
    with load_chain(root / "rank1", "prism", CR, options=ONE_THREAD) as chain:
        assert chain.device == torch.device("cpu")
        bound = []
        for runner in chain.runners:
            assert runner.device == chain.device and runner.stream is None
            binding = runner._binding

            class Recording:
                def __getattr__(self, name, binding=binding):
                    return getattr(binding, name)

                def bind_output(self, name, kind, index, *rest, binding=binding):
                    bound.append((name, kind, index))
                    return binding.bind_output(name, kind, index, *rest)

            runner._binding = Recording()
        request = InferenceRequest.of(chain.manifest.model, torch.randn(2, 3, 32, 32))
        share = chain.to_engine(chain.manifest.model.modality.share(request.tensors, chain.config.plan, 1))
        tokens, means = chain.embed(share)
        chain.block(0, tokens, torch.zeros(2, chain.config.plan.counts[0], 32), share)
        assert bound and all(kind == "cpu" and index == 0 for _, kind, index in bound)
    with pytest.raises(UsageError, match="--device cpu"):
        load_chain(root / "rank0", "local", options=RuntimeOptions(threads=1, device="cuda:0"))


def test_gpu_provider_options_share_the_stream_and_capture_graphs():
    """What onnxruntime's GPU EPs are given (checked without a GPU): the compute stream's handle,
    and CUDA graphs only where asked; each batch size its own graph and no synchronisation."""
    from prism_trt.engines.base import TensorSpec
    from prism_trt.engines.ort import OnnxRuntimeBackend
    from prism_trt.engines.ort.runner import OnnxRuntimeRunner

    class Stream:
        cuda_stream = 1234

    inputs = [TensorSpec("x", ("batch", 4), "float32")]
    for provider in ("cuda", "tensorrt"):
        providers = OnnxRuntimeBackend(provider).providers(inputs, BuildOptions(), Stream(), cuda_graphs=True)
        gpu = [options for name, options in providers[:-1]]
        assert all(o["user_compute_stream"] == "1234" and o["has_user_compute_stream"] == "1" for o in gpu)
        assert providers[-1] == "CPUExecutionProvider"
        assert gpu[-1].get("enable_cuda_graph") == "1"
    assert "user_compute_stream" not in OnnxRuntimeBackend("cuda").providers(inputs, BuildOptions())[0][1]
    runner = OnnxRuntimeRunner(Path("x.onnx"), None, inputs, inputs, BuildOptions(), torch.device("cpu"), True)
    runner.stream = Stream()
    options = runner.run_options(8)
    assert options.get_run_config_entry("gpu_graph_id") == "8"
    assert options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert runner.run_options(8) is options
    with pytest.raises(UsageError, match="CUDA graphs"):
        OnnxRuntimeBackend("cpu").load(Path("x.onnx"), inputs, inputs, BuildOptions(), cuda_graphs=True)


def test_transfers_count_and_reuse():
    transfers = DeviceTransfers("cpu")
    images = torch.randn(2, 3)
    assert transfers.request_to_device({"images": images})["images"] is images  # the CPU copies nothing
    assert transfers.to_host(images, Crossing.LOGITS) is images
    transfers.count(Crossing.EXCHANGE, None)
    assert transfers.to_dict() == {"bytes": {"request": 24, "exchange": 0, "logits": 24, "other": 0},
                                   "crossings": {"request": 1, "exchange": 0, "logits": 1, "other": 0}}
    transfers.reset()
    assert sum(transfers.bytes.values()) == 0 == sum(transfers.crossings.values())
    with pytest.raises(UsageError):
        DeviceTransfers("mps")
    assert get_backend("onnxruntime").tensor_device(BuildOptions()) == torch.device("cpu")
