"""GPU paths: skipped here with the reason, run where a CUDA device (and onnxruntime-gpu) exists."""

import pytest
import torch
from conftest import assert_close, build_engines, random_model, small_spec

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.engines import get_backend
from prism_trt.runtime.chain import EngineChain, run_chains_in_process
from prism_trt.runtime.staging import TorchCudaStaging

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
def test_ort_cuda_chain_on_device_tensors(tmp_path):
    model = random_model(small_spec(img=32, depth=2))
    spec = model.spec
    backend = get_backend("onnxruntime", provider="cuda")
    build_engines(model, tmp_path, 2, [3.0], max_batch=8, backend=backend)
    from prism_trt.engines.manifest import find_config, load_manifest

    chains = []
    for rank in range(2):
        manifest = load_manifest(tmp_path / f"rank{rank}")
        chains.append(EngineChain(tmp_path / f"rank{rank}", manifest, find_config(manifest, "prism", 3.0),
                                  backend).__enter__())
    images = torch.randn(3, 3, 32, 32)
    got = run_chains_in_process(chains, images.cuda())
    assert got.is_cuda
    plan = make_segment_plan(make_partition_plan(spec.num_tokens, 1, 2), cr=3.0)
    assert_close(got.cpu(), simulate(model, images, plan))
