"""GPU paths: skipped here with the reason, run where a CUDA device (and onnxruntime-gpu) exists."""

import pytest
import torch
from conftest import assert_close, build_engines, random_model, small_spec

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.engines import get_backend
from prism_trt.runtime import RuntimeOptions
from prism_trt.runtime.chain import EngineChain, run_chains_in_process
from prism_trt.runtime.request import InferenceRequest
from prism_trt.runtime.staging import TorchCudaStaging
from prism_trt.runtime.transfers import Crossing

ON_GPU = RuntimeOptions(device="cuda:0")

HAS_CUDA = torch.cuda.is_available()


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch (CPU-only machine)")
needs_ort_cuda = pytest.mark.skipif(not (HAS_CUDA and _ort_cuda()),
                                    reason="needs a CUDA device and onnxruntime-gpu (pip install .[gpu])")


@needs_cuda
def test_torch_cuda_staging_round_trip():
    counts, dim = [3, 2, 2], 8
    staging = TorchCudaStaging(counts, rank=1, dim=dim, device="cuda")
    buffers = staging.buffers(("test", 4), 4)
    assert buffers.send.is_pinned() and all(slot.is_pinned() for slot in buffers.gathered)
    means = torch.randn(4, 2, dim, device="cuda")
    sent = staging.to_host(means, buffers)
    assert torch.equal(sent[:, :2], means.cpu())
    for q, slot in enumerate(buffers.gathered):
        slot.fill_(float(q))
    remote = staging.to_device(buffers)
    assert remote.is_cuda and remote.shape == (4, 5, dim)
    assert torch.equal(remote[:, :3].cpu(), torch.zeros(4, 3, dim))
    assert torch.equal(remote[:, 3:].cpu(), torch.full((4, 2, dim), 2.0))
    assert staging.buffers(("test", 4), 4) is buffers and staging.allocations == 1


@needs_ort_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_ort_cuda_chain_on_device_tensors(tmp_path, precision):
    """A 2-rank prism chain on the CUDA EP, fed device tensors, equal to the reference under the
    precision's tolerance (onnxruntime's CUDA EP computes fp32 matmuls in TF32 unless told not to)."""
    model = random_model(small_spec(img=32, depth=2))
    spec = model.spec
    backend = get_backend("onnxruntime", provider="cuda")
    build_engines(model, tmp_path, 2, [3.0], max_batch=8, backend=backend, precision=precision)
    from prism_trt.engines import Manifest

    chains = []
    for rank in range(2):
        manifest = Manifest.load(tmp_path / f"rank{rank}")
        assert manifest.build_options.precision == precision
        chains.append(EngineChain(tmp_path / f"rank{rank}", manifest, manifest.config(manifest.key_for("prism", 3.0)),
                                  backend, options=ON_GPU).__enter__())
    images = torch.randn(3, 3, 32, 32)
    got = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images.cuda()))
    assert got.is_cuda
    plan = make_segment_plan(make_partition_plan(spec.num_tokens, 1, 2), cr=3.0)
    assert_close(got.cpu(), simulate(model, images, plan), precision)


@needs_ort_cuda
@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_mnist_accuracy_of_reduced_precision_gpu_builds(mnist_model, mnist_dir, tmp_path, precision):
    """The shipped checkpoint built for the CUDA EP in tf32 / fp16: every stage verified on the GPU
    and the full test set within 10 images of the fp32 result (9721/10000)."""
    from prism_trt.data import MnistTestSet
    from prism_trt.runtime import load_chain

    backend = get_backend("onnxruntime", provider="cuda")
    build_engines(mnist_model, tmp_path, 1, source={"checkpoint": "vit_mnist.pt"}, backend=backend,
                  precision=precision)
    correct = 0
    with load_chain(tmp_path / "rank0", "local", options=ON_GPU) as chain:
        for images, labels in MnistTestSet(mnist_dir).batches(500):
            correct += int((run_chains_in_process([chain], InferenceRequest.of(chain.manifest.model, images.cuda()))
                            .argmax(-1).cpu() == labels).sum())
    assert abs(correct - 9721) <= 10, correct


@needs_ort_cuda
@pytest.mark.parametrize("precision", ["tf32", "fp16"])
@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased"])
def test_text_chains_on_the_cuda_ep(tmp_path, name, precision):
    """Text stages built for the CUDA EP (every stage verified there by `build`), then a 2-rank
    prism chain and the local chain fed device ids and mask, equal to the torch reference under the
    precision's tolerance on right-padded batches."""
    pytest.importorskip("transformers", reason="the text models need the 'text' extra")
    from click.testing import CliRunner
    from conftest import TEXT_SEQ_LEN, TEXT_SIZE, text_request

    from prism_trt.cli import main
    from prism_trt.core.text_rank import simulate_text, text_partition
    from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS
    from prism_trt.model.text_adapters import load_text_model, size_overrides
    from prism_trt.runtime import load_chain

    sizes = [f"--{key.replace('_', '-')}={value}" for key, value in TEXT_SIZE.items()]
    result = CliRunner().invoke(main, ["build", "--model", name, *sizes, "--seq-len", str(TEXT_SEQ_LEN), "--ranks",
                                       "2", "--cr", "2", "--provider", "cuda", "--precision", precision,
                                       "--exporter", "torchscript", "--opt-batch", "2", "--max-batch", "4",
                                       "--out", str(tmp_path), "-q"])
    assert result.exit_code == 0, result.output
    model = load_text_model(name, **size_overrides(name, **TEXT_SIZE))
    ids, mask = text_request()
    request = {INPUT_IDS: ids.cuda(), ATTENTION_MASK: mask.cuda()}
    ranks = [load_chain(tmp_path / f"rank{r}", "prism", 2.0, options=ON_GPU).__enter__() for r in range(2)]
    got = run_chains_in_process(ranks, InferenceRequest.of(ranks[0].manifest.model, request))
    assert got.is_cuda
    plan = make_segment_plan(text_partition(model.spec, TEXT_SEQ_LEN, 2), segments=ranks[0].config.plan.segments)
    assert_close(got.cpu(), simulate_text(model, plan, ids, mask), precision, name=f"{name} prism {precision}")
    with load_chain(tmp_path / "rank0", "local", options=ON_GPU) as local:
        assert_close(run_chains_in_process([local], InferenceRequest.of(local.manifest.model, request)).cpu(),
                     model(ids, mask), precision, name=f"{name} local {precision}")


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory):
    """A small random ViT built for the CUDA EP in fp32, two ranks (local + monolithic, voltage, prism CR 3)."""
    if not (HAS_CUDA and _ort_cuda()):
        pytest.skip("needs a CUDA device and onnxruntime-gpu (pip install .[gpu])")
    root = tmp_path_factory.mktemp("cuda-engines")
    model = random_model(small_spec(img=32, depth=2))
    build_engines(model, root, 2, [3.0], max_batch=8, backend=get_backend("onnxruntime", provider="cuda"),
                  precision="fp32")
    return root, model


@needs_ort_cuda
def test_device_resident_chain_crosses_only_the_request_and_the_logits(cuda_engines):
    """Every stage writes on the GPU, on the shared compute stream; a host request crosses once,
    the logits once, nothing else; the answer equals the reference at fp32."""
    from prism_trt.engines.device import compute_stream
    from prism_trt.runtime import load_chain
    from prism_trt.runtime.chain import run_local

    root, model = cuda_engines
    with load_chain(root / "rank0", "local", options=ON_GPU) as chain:
        stream = compute_stream(chain.device)
        assert all(r.device == chain.device and r.stream is stream for r in chain.runners)
        images = torch.randn(3, 3, 32, 32)
        request = InferenceRequest.of(chain.manifest.model, images)
        with torch.cuda.stream(stream):  # the chain reads its share: the patches, cast on the device
            placed = chain.to_engine(chain.manifest.model.modality.share(request.tensors, chain.config.plan, 0))
            tokens, means = chain.embed(placed)
        assert tokens.is_cuda and all(t.is_cuda for t in placed.values())
        chain.transfers.reset()
        got = run_local(chain, request)
        assert not got.is_cuda
        assert chain.transfers.crossings == {Crossing.REQUEST: 1, Crossing.EXCHANGE: 0, Crossing.LOGITS: 1,
                                             Crossing.OTHER: 0}
        with torch.no_grad():
            assert_close(got, model(images), "fp32")
        first = chain.transfers.request_to_device(request.tensors)["images"]
        assert chain.transfers.request_to_device(request.tensors)["images"].data_ptr() == first.data_ptr()


@needs_ort_cuda
def test_uint8_pixels_cross_to_the_gpu_as_bytes(cuda_engines):
    """A UINT8 request crosses host -> device one byte a value and is cast to float32 there; its
    logits equal those of the same images sent normalised."""
    from prism_trt.runtime import load_chain
    from prism_trt.runtime.chain import run_local

    root, _ = cuda_engines
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    normalised = (pixels.float() / 255 - 0.5) / 0.5  # small_spec: mean = std = 0.5
    with load_chain(root / "rank0", "local", options=ON_GPU) as chain:
        chain.transfers.reset()
        raw = run_local(chain, InferenceRequest.of(chain.manifest.model, pixels))
        assert chain.transfers.bytes[Crossing.REQUEST] == pixels.numel()
        assert_close(raw, run_local(chain, InferenceRequest.of(chain.manifest.model, normalised)), "fp32")


@needs_ort_cuda
def test_cuda_events_time_device_phases_without_synchronising_each():
    from prism_trt.runtime.timing import Stopwatch

    watch = Stopwatch.on("cuda:0")
    assert watch.stream is not None
    x = torch.randn(2048, 2048, device="cuda")
    with torch.cuda.stream(watch.stream):
        with watch.phase("compute"):
            for _ in range(10):
                x = x @ x / 2048
        with watch.phase("comm"):  # a host phase: timed by the host clock
            pass
    assert len(watch._events) == 1  # the device phase is pending, not synchronised yet
    times = watch.resolve()
    assert times.compute > 0 and times.comm >= 0 and not watch._events


@needs_ort_cuda
def test_local_mode_on_the_gpu_runs_the_monolithic_engine(cuda_engines):
    from prism_trt.engines import ChainKey
    from prism_trt.runtime.local import LocalExecutor

    root, model = cuda_engines
    executor = LocalExecutor(root / "rank0", ON_GPU)
    try:
        assert executor.chain_of[None].is_monolithic
        images = torch.randn(5, 3, 32, 32)
        result = executor.infer(executor.request(images), ChainKey.local())
        assert not result.logits.is_cuda and result.times.compute > 0
        with torch.no_grad():
            assert_close(result.logits, model(images), "fp32")
    finally:
        executor.close()


@needs_ort_cuda
def test_cuda_graphs_replay_the_same_answers(cuda_engines):
    """The optional CUDA-graph chain: one graph per batch size, captured then replayed, answers
    equal to the chain without graphs (fixed addresses come from the reused buffers)."""
    from prism_trt.runtime import load_chain

    root, _ = cuda_engines
    graphs = RuntimeOptions(device="cuda:0", cuda_graphs=True)
    with load_chain(root / "rank0", "local", options=ON_GPU) as plain, \
            load_chain(root / "rank0", "local", options=graphs) as captured:
        for batch in (2, 4, 2, 4):
            images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
            want = run_chains_in_process([plain], InferenceRequest.of(plain.manifest.model, images)).cpu()
            got = run_chains_in_process([captured], InferenceRequest.of(captured.manifest.model, images)).cpu()
            assert_close(got, want, "fp32")


@needs_ort_cuda
def test_two_ranks_on_one_gpu_cross_only_the_exchange(cuda_engines):
    """The residency guard of the CPU suite, with both ranks on the GPU (staging for real)."""
    import subprocess
    import sys

    from prism_trt.runtime.distributed import DistributedExecutor
    from prism_trt.runtime.group import GroupConfig, free_port

    root, model = cuda_engines
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(root), "--rank", "1",
                               "--world-size", "2", "--master-port", str(port), "--device", "cuda:0",
                               "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    executor = None
    try:
        executor = DistributedExecutor(root / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 60.0), ON_GPU)
        executor.rank.transfers.reset()
        images = torch.randn(4, 3, 32, 32)
        result = executor.infer(executor.request(images), executor.key_for("prism", 3.0))
        assert not result.fell_back and not result.logits.is_cuda
        crossings = executor.rank.transfers.crossings
        assert crossings[Crossing.REQUEST] == 1 and crossings[Crossing.LOGITS] == 1 and crossings[Crossing.OTHER] == 0
        plan = make_segment_plan(make_partition_plan(model.spec.num_tokens, 1, 2), cr=3.0)
        assert_close(result.logits, simulate(model, images, plan), "fp32")
    finally:
        if executor is not None:
            executor.close()
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
