"""Each rank receives only its share of a request: real GLOO groups of 2 and 3 processes over
loopback, even and weighted partitions, a ViT (MNIST) and text models (BERT, GPT-2).

A ViT worker receives its own patches' pixels, B * n_patches * C * ph * pw values: one byte each
for a UINT8 request, four for an FP32 one (mapped to the raw scale on rank 0). A text worker
receives its own positions' ids and mask (B * n_p INT64 each) and, where it attends to remote
means, their segments' valid-token counts (B * m float32). Rank 0 reports the sum it sent.
"""

import pytest
import torch
from conftest import TEXT_SEQ_LEN, TEXT_SIZE, assert_close, text_request
from test_distributed import rank0_with_workers

from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.core.plan import attended_ranks
from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS
from prism_trt.export.build import Builder, config_plans

pytestmark = pytest.mark.timeout(300)
MNIST_PATCH_VALUES = 16  # 1 channel x 4 x 4 pixels


def build_weighted(model, out, ranks: int, weights, crs=(5.0,)):
    """MNIST engines for ``ranks`` ranks over a partition proportional to ``weights`` (None: even)."""
    from prism_trt.engines import BuildOptions, get_backend

    spec = model.spec
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, ranks, list(crs), [], weights)
    builder = Builder(model, {"checkpoint": "vit_mnist.pt"}, get_backend("onnxruntime", threads=1),
                      BuildOptions(max_batch=8), exporter="torchscript")
    builder.build(out, ranks, configs, progress=False)
    return configs[-1].plan


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """MNIST's normalised test images back as the bytes they were (exact: they came from bytes)."""
    return ((images * 0.3081 + 0.1307) * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("ranks, weights", [(2, None), (3, [1.0, 2.0, 1.0])], ids=["2-even", "3-weighted"])
def test_vit_ranks_receive_only_their_patches(mnist_model, mnist_dir, tmp_path, ranks, weights):
    from prism_trt.data import MnistTestSet

    plan = build_weighted(mnist_model, tmp_path, ranks, weights)
    images, _ = next(MnistTestSet(mnist_dir, limit=6).batches(6))
    pixels = raw_pixels(images)
    patch_counts = [plan.partition.patch_count(r) for r in range(ranks)]
    assert sum(patch_counts) == 49 and (weights is None or patch_counts[1] > patch_counts[0])
    expected = simulate(mnist_model, images, plan)
    with rank0_with_workers(tmp_path, ranks) as executor:
        key = executor.key_for("prism", 5.0)
        for request, width in ((images, 4), (pixels, 1)):  # FP32 normalised, UINT8 raw pixels
            result = executor.infer(executor.request(request), key, gather_timings=True)
            assert not result.fell_back
            assert_close(result.logits, expected, name=f"{request.dtype} request")
            received = [times.request_bytes for times in result.per_rank]
            shares = [6 * n * MNIST_PATCH_VALUES * width for n in patch_counts]
            assert received[1:] == shares[1:], (received, shares)
            assert received[0] == sum(shares[1:])  # rank 0 sent them, and nothing of its own
            whole = 6 * 28 * 28 * 4  # what the broadcast sent every worker
            assert max(received[1:]) * (2 if width == 4 else 8) <= whole * 1.1


@pytest.mark.parametrize("name, ranks, weights", [("bert-base-uncased", 2, None), ("gpt2", 3, "1,2,1")],
                         ids=["bert-2-even", "gpt2-3-weighted"])
def test_text_ranks_receive_only_their_positions(text_engines, tmp_path, name, ranks, weights):
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from prism_trt.cli import main
    from prism_trt.core import simulate_text

    if weights is None:
        directory, model = text_engines(name)
    else:
        from prism_trt.model.text_adapters import load_text_model, size_overrides

        directory, model = tmp_path, load_text_model(name, **size_overrides(name, **TEXT_SIZE))
        sizes = [arg for key, value in TEXT_SIZE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
        result = CliRunner().invoke(main, ["build", "--model", name, *sizes, "--seq-len", str(TEXT_SEQ_LEN),
                                           "--ranks", str(ranks), "--weights", weights, "--cr", "2",
                                           "--exporter", "torchscript", "--opt-batch", "2", "--max-batch", "4",
                                           "--threads", "1", "--out", str(directory), "-q"])
        assert result.exit_code == 0, result.output
    ids, mask = text_request(3, 1, (16, 11, 5))
    with rank0_with_workers(directory, ranks) as executor:
        key = executor.key_for("prism", 2.0)
        request = executor.request({INPUT_IDS: ids, ATTENTION_MASK: mask})
        result = executor.infer(request, key, gather_timings=True)
        plan = executor.rank.routes[executor.rank.config_index(key, request.bucket_length)].config.plan
        assert not result.fell_back
        assert_close(result.logits, simulate_text(model, plan, ids, mask))
    sizes = plan.partition.sizes
    assert weights is None or sizes[1] > sizes[0]
    received = [times.request_bytes for times in result.per_rank]
    for rank in range(1, ranks):
        remote = sum(plan.counts[q] for q in attended_ranks(ranks, rank, model.spec.causal))
        assert received[rank] == 3 * sizes[rank] * 8 * 2 + 3 * remote * 4, (rank, received)
    assert received[0] == sum(received[1:])
    assert max(received[1:]) < 3 * TEXT_SEQ_LEN * 8 * 2  # less than the whole ids and mask


def test_uneven_shares_make_uneven_patches(mnist_model):
    """The shares are cut by the plan: weighted sizes, prefix on rank 0, patches in patchify order."""
    from prism_trt.engines.modality import Vision
    from prism_trt.engines.stage_spec import IMAGES, PATCHES
    from prism_trt.model.vit import patchify

    partition = make_partition_plan(50, 1, 3, [1.0, 3.0, 1.0])
    plan = make_segment_plan(partition, segments=2)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    vision = Vision(mnist_model.spec)
    shares = [vision.share({IMAGES: images}, plan, r)[PATCHES] for r in range(3)]
    assert [s.shape[1] for s in shares] == [partition.patch_count(r) for r in range(3)]
    assert all(s.dtype == torch.uint8 and s.is_contiguous() for s in shares)
    assert torch.equal(torch.cat(shares, dim=1), patchify(images, (4, 4)))
