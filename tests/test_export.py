"""ONNX stages: export, onnx.checker, onnxruntime chains equal to the reference forward."""

from pathlib import Path

import pytest
import torch
from conftest import TWO_THREADS, assert_close, build_engines, needs_dynamo

from prism_trt.core import make_partition_plan, make_segment_plan, simulate, voltage_plan
from prism_trt.engines import EngineInputError
from prism_trt.export.onnx_export import check_onnx, export_stage
from prism_trt.export.stages import monolithic_stage, rank_stages
from prism_trt.export.verify import verify_onnx
from prism_trt.runtime import load_chain, run_chains_in_process
from prism_trt.runtime.request import InferenceRequest

CRS = [9.9, 3.3]


def build(model, source, out: Path, ranks: int, crs=CRS, exporter="torchscript", segments=()):
    return build_engines(model, out, ranks, crs, segments, source=source, threads=2, exporter=exporter)


@pytest.fixture(scope="module")
def tiny_builds(timm_pair, tmp_path_factory):
    """vit_tiny_patch16_224 built for P = 1, 2, 3 (local, voltage, CR 9.9 and 3.3)."""
    _, model = timm_pair("vit_tiny_patch16_224")
    root = tmp_path_factory.mktemp("tiny")
    for ranks in (1, 2, 3):
        build(model, {"timm": "vit_tiny_patch16_224"}, root / f"p{ranks}", ranks)
    return root


def _run(chains, images: torch.Tensor) -> torch.Tensor:
    return run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))


def _chains(directory: Path, ranks: int, mode: str, cr=None):
    return [load_chain(directory / f"rank{r}", mode, cr, options=TWO_THREADS).__enter__() for r in range(ranks)]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_every_stage_verified(tiny_builds, ranks):
    from prism_trt.engines import Manifest

    for rank in range(ranks):
        manifest = Manifest.load(tiny_builds / f"p{ranks}" / f"rank{rank}")
        modes = {c.mode for c in manifest.configs}
        assert modes == ({"local"} if ranks == 1 else ({"local", "voltage", "prism"} if rank == 0 else
                                                       {"voltage", "prism"}))
        for config in manifest.configs:
            assert [s.name for s in config.stages][:2] == ["embed", "block_00"]
            for stage in config.stages:
                check = stage.verification.engine
                assert check.precision == "fp32" and check.passed and check.used <= 1
                assert stage.verification.export is None  # a CPU fp32 engine check covers the export


@pytest.mark.parametrize("ranks, mode, cr", [(1, "local", None), (2, "voltage", None), (3, "voltage", None),
                                             (2, "prism", 9.9), (2, "prism", 3.3), (3, "prism", 9.9),
                                             (3, "prism", 3.3)])
def test_chained_engines_equal_reference(timm_pair, tiny_builds, ranks, mode, cr):
    reference, model = timm_pair("vit_tiny_patch16_224")
    torch.manual_seed(3)
    images = torch.randn(3, 3, 224, 224)
    chains = _chains(tiny_builds / f"p{ranks}", ranks if mode != "local" else 1, mode, cr)
    got = run_chains_in_process(chains, InferenceRequest.of(chains[0].manifest.model, images))
    with torch.no_grad():
        if mode == "prism":
            segments = chains[0].config.plan.segments
            expected = simulate(model, images, make_segment_plan(make_partition_plan(197, 1, ranks), segments=segments))
        else:
            expected = reference(images)
    assert_close(got, expected)


def test_monolithic_equals_reference(timm_pair, tiny_builds):
    reference, _ = timm_pair("vit_tiny_patch16_224")
    images = torch.randn(2, 3, 224, 224)
    with load_chain(tiny_builds / "p1" / "rank0", "local", use_monolithic=True, options=TWO_THREADS) as chain:
        got = chain.monolithic(InferenceRequest.of(chain.manifest.model, images))
    with torch.no_grad():
        assert_close(got, reference(images))


@needs_dynamo
def test_dynamo_exporter_each_stage_kind(mnist_model, tmp_path):
    """The default exporter on every kind of stage (embed, block with/without means out, head, model)."""
    plan = make_segment_plan(make_partition_plan(50, 1, 2), segments=5)
    stages = rank_stages(mnist_model, plan, 0)
    chosen = [stages[0], stages[1], stages[-2], stages[-1], monolithic_stage(mnist_model)]
    for stage, module in chosen:
        path = tmp_path / f"{stage.name}.onnx"
        export_stage(module, stage, path, "dynamo")
        check_onnx(path, stage)
        for check in verify_onnx(path, module, stage).outputs:
            assert check.passed, check.describe()


def test_runner_rejects_bad_feeds(tiny_builds):
    with load_chain(tiny_builds / "p2" / "rank1", "prism", 9.9, options=TWO_THREADS) as chain:
        _, runner = chain.stages["block_00"]
        good = {"tokens": torch.zeros(2, 98, 192), "remote_means": torch.zeros(2, 11, 192)}
        runner.infer(good)
        with pytest.raises(EngineInputError, match="missing"):
            runner.infer({"tokens": good["tokens"]})
        with pytest.raises(EngineInputError, match="must have shape"):
            runner.infer({**good, "tokens": torch.zeros(2, 97, 192)})
        with pytest.raises(EngineInputError, match="must be float32"):
            runner.infer({**good, "tokens": good["tokens"].double()})
        with pytest.raises(EngineInputError, match="disagree on the batch size"):
            runner.infer({**good, "tokens": torch.zeros(3, 98, 192)})


def test_mnist_local_chain_full_test_set(mnist_model, mnist_dir, tmp_path):
    """The real checkpoint through onnxruntime stage engines: 9721/10000 at P=1, from normalised
    FP32 images and from their raw UINT8 pixels alike (the engines normalise)."""
    from prism_trt.data import MnistTestSet

    build(mnist_model, {"checkpoint": "vit_mnist.pt"}, tmp_path, 1)
    correct = {"fp32": 0, "uint8": 0}
    test_set = MnistTestSet(mnist_dir)
    with load_chain(tmp_path / "rank0", "local", options=TWO_THREADS) as chain:
        for (images, labels), (pixels, _) in zip(test_set.batches(500), test_set.batches(500, raw=True)):
            logits = {kind: run_chains_in_process([chain], InferenceRequest.of(chain.manifest.model, x))
                      for kind, x in (("fp32", images), ("uint8", pixels))}
            assert_close(logits["uint8"], logits["fp32"], name="UINT8 vs FP32 logits")
            for kind, answer in logits.items():
                correct[kind] += int((answer.argmax(-1) == labels).sum())
    assert correct == {"fp32": 9721, "uint8": 9721}


def test_mnist_p2_chains_agree(mnist_model, mnist_dir, tmp_path):
    from prism_trt.data import MnistTestSet

    build(mnist_model, {"checkpoint": "vit_mnist.pt"}, tmp_path, 2, crs=[5.0])
    images, labels = next(MnistTestSet(mnist_dir, limit=256).batches(256))
    with torch.no_grad():
        reference = mnist_model(images)
    voltage = _run(_chains(tmp_path, 2, "voltage"), images)
    assert_close(voltage, reference)
    prism = _run(_chains(tmp_path, 2, "prism", 5.0), images)
    expected = simulate(mnist_model, images, make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0))
    assert_close(prism, expected)


def test_rebuild_skips_unchanged_stages(mnist_model, tmp_path):
    first = build(mnist_model, {"checkpoint": "vit_mnist.pt"}, tmp_path, 2, crs=[5.0])
    assert all(s.exported and s.built for s in first.stages)
    again = build(mnist_model, {"checkpoint": "vit_mnist.pt"}, tmp_path, 2, crs=[5.0])
    assert not any(s.exported or s.built for s in again.stages)
    # a changed plan rebuilds only what changed: the CR 5 chains are reused, CR 2.5 is new
    more = build(mnist_model, {"checkpoint": "vit_mnist.pt"}, tmp_path, 2, crs=[5.0, 2.5])
    assert {s.config for s in more.stages if s.exported} == {"prism-cr2.5"}


@needs_dynamo
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_dynamo_full_build_vit_tiny(timm_pair, tmp_path, ranks):
    reference, model = timm_pair("vit_tiny_patch16_224")
    build(model, {"timm": "vit_tiny_patch16_224"}, tmp_path, ranks, exporter="dynamo")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
    mode = "local" if ranks == 1 else "voltage"
    got = _run(_chains(tmp_path, ranks if ranks > 1 else 1, mode), images)
    assert_close(got, expected)
    if ranks > 1:
        plan = voltage_plan(make_partition_plan(197, 1, ranks))
        assert plan.is_lossless
