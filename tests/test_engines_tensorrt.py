"""The native TensorRT backend.

Two kinds of test:
* GPU tests (build and run real engines) are skipped unless tensorrt and a CUDA device are present;
* the fp16 ONNX cast and the missing-tensorrt paths run everywhere (CPU, onnxruntime).
No fakes of tensorrt or pycuda: what cannot run here is skipped with the reason, not simulated.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_close, needs_dynamo, random_model, small_spec
from onnx import TensorProto, helper, numpy_helper

from prism_trt.engines.base import BackendUnavailable, BuildOptions, EngineInputError, TensorSpec
from prism_trt.engines.fp16 import cast_onnx_to_fp16
from prism_trt.engines.onnx_format import probe_onnxruntime_limits, save_onnx
from prism_trt.engines.trt import TensorRTBackend

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_PYCUDA = importlib.util.find_spec("pycuda") is not None
HAS_CUDA = torch.cuda.is_available()
NO_GPU_REASON = ("tensorrt not installed: pip install .[trt] on a machine with an NVIDIA GPU" if not HAS_TENSORRT
                 else "no CUDA device visible to torch: the tensorrt tests need an NVIDIA GPU")
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA), reason=NO_GPU_REASON)
needs_gpu_and_pycuda = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA and HAS_PYCUDA),
                                          reason=NO_GPU_REASON if not (HAS_TENSORRT and HAS_CUDA)
                                          else "pycuda not installed: pip install .[trt]")

TOKENS, REMOTE, DIM = 9, 3, 32  # small_spec(): 1 prefix + 8 of 16 patches, 3 remote means, D = 32
STAGE_INPUTS = [TensorSpec("x", ("batch", TOKENS, DIM), "float32"),
                TensorSpec("remote_means", ("batch", REMOTE, DIM), "float32"),
                TensorSpec("remote_log_sizes", ("batch", 1, 1, REMOTE), "float32")]
STAGE_OUTPUTS = [TensorSpec("y", ("batch", TOKENS, DIM), "float32")]


class BlockStage(torch.nn.Module):
    """One PrismBlock with remote means, named inputs in the order the ONNX declares them."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, remote_means, remote_log_sizes):
        return self.block(x, remote_means, remote_log_sizes)


def stage_feed(batch: int, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    feed = {spec.name: torch.randn(spec.concrete(batch), generator=generator) for spec in STAGE_INPUTS}
    feed["remote_log_sizes"] = feed["remote_log_sizes"].abs()
    return {name: tensor.to(device) for name, tensor in feed.items()}


@pytest.fixture(scope="module")
def block_stage() -> BlockStage:
    return BlockStage(random_model(small_spec()).blocks[0]).eval()


def export_stage(stage: BlockStage, path: Path, dynamo: bool) -> Path:
    example = tuple(stage_feed(2).values())
    names = [spec.name for spec in STAGE_INPUTS]
    with warnings.catch_warnings():  # exporter deprecation and tracer chatter, not about this code
        warnings.simplefilter("ignore")
        _export(stage, example, path, names, dynamo)
    return path


def _export(stage: BlockStage, example: tuple, path: Path, names: list[str], dynamo: bool) -> None:
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(stage, example, str(path), dynamo=True, input_names=names, output_names=["y"],
                          dynamic_shapes={name: {0: batch} for name in names})
    else:
        torch.onnx.export(stage, example, str(path), dynamo=False, input_names=names, output_names=["y"],
                          dynamic_axes={name: {0: "batch"} for name in [*names, "y"]}, opset_version=17)


@pytest.fixture(scope="module")
def stage_onnx(block_stage, tmp_path_factory) -> Path:
    return export_stage(block_stage, tmp_path_factory.mktemp("onnx") / "block.onnx", dynamo=False)


def run_onnx(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


# -- runs everywhere: fp16 cast ------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=needs_dynamo)], ids=["torchscript", "dynamo"])
def test_cast_onnx_to_fp16_matches_fp32(block_stage, tmp_path, dynamo):
    src = export_stage(block_stage, tmp_path / "block.onnx", dynamo=dynamo)
    dst = tmp_path / "block.fp16.onnx"
    cast_onnx_to_fp16(src, dst)

    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [TensorProto.FLOAT] * 4
    assert TensorProto.FLOAT not in {t.data_type for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    float32_inside = [v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    assert float32_inside == []  # every float inside the graph computes in fp16

    feed = {name: tensor.numpy() for name, tensor in stage_feed(5, seed=1).items()}
    (fp32,), (fp16,) = run_onnx(src, feed), run_onnx(dst, feed)
    assert fp16.dtype == np.float32
    assert_close(fp16, fp32, "fp16")


def test_cast_onnx_to_fp16_on_the_pipeline_stages(tmp_path):
    # The stages the build pipeline exports: embed, blocks with remote means, and a whole model with its head.
    from prism_trt.core import make_partition_plan, make_segment_plan
    from prism_trt.export.onnx_export import export_stage as export_pipeline_stage
    from prism_trt.export.stages import example_feed, monolithic_stage, rank_stages

    model = random_model(small_spec())
    plan = make_segment_plan(make_partition_plan(model.spec.num_tokens, model.spec.num_prefix_tokens, 2), cr=2.0)
    for spec, module in [*rank_stages(model, plan, 1), monolithic_stage(model)]:
        src, dst = tmp_path / f"{spec.name}.onnx", tmp_path / f"{spec.name}.fp16.onnx"
        export_pipeline_stage(module, spec, src, exporter="torchscript")
        cast_onnx_to_fp16(src, dst)
        feed = {name: tensor.numpy() for name, tensor in example_feed(spec, batch=3).items()}
        for fp32, fp16 in zip(run_onnx(src, feed), run_onnx(dst, feed)):
            assert_close(fp16, fp32, "fp16", name=spec.name)


def test_cast_onnx_to_fp16_constants_casts_and_reused_outputs(tmp_path):
    # y is both a graph output and an input of another node; constants come in three spellings.
    nodes = [
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["x", "half"], ["scaled"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Add", ["scaled", "zeros"], ["shifted"]),
        helper.make_node("Cast", ["x"], ["rounded"], to=TensorProto.INT32),
        helper.make_node("Cast", ["rounded"], ["rounded_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["shifted", "rounded_float"], ["y"]),
        helper.make_node("Mul", ["y", "weight"], ["y2"]),
    ]
    weight = numpy_helper.from_array(np.linspace(-2, 2, 4, dtype=np.float32), "weight")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 4])], [weight])
    src, dst = tmp_path / "g.onnx", tmp_path / "g.fp16.onnx"
    save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    cast_onnx_to_fp16(src, dst)

    onnx.checker.check_model(str(dst), full_check=True)
    # helper.make_model stamps the newest IR version onnx knows; both files carry the lowest opset 17 allows.
    assert onnx.load(str(src)).ir_version == onnx.load(str(dst)).ir_version == 8 <= probe_onnxruntime_limits()[0]
    feed = {"x": np.array([[0.2, -1.7, 3.1, 8.0], [1.0, 2.5, -0.4, 0.0]], np.float32)}
    for fp32, fp16 in zip(run_onnx(src, feed), run_onnx(dst, feed)):
        assert fp16.dtype == np.float32
        assert_close(fp16, fp32, "fp16")


# -- runs everywhere: without tensorrt -----------------------------------------------------------
def test_check_available_says_what_to_install_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, installed or not
    with pytest.raises(BackendUnavailable, match=r"pip install \.\[trt\].*import tensorrt"):
        TensorRTBackend().check_available()


def test_backend_imports_without_tensorrt_or_pycuda():
    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['pycuda'] = None\n"
            "from prism_trt.engines.trt.backend import TensorRTBackend\n"
            "assert TensorRTBackend.name == 'tensorrt' and TensorRTBackend.engine_suffix == '.plan'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- needs tensorrt and a GPU --------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_engine_matches_torch(block_stage, stage_onnx, tmp_path, precision):
    backend = TensorRTBackend()
    backend.check_available()
    cache = tmp_path / "timing.cache"
    options = BuildOptions(precision=precision, min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256,
                           optimization_level=1, timing_cache=str(cache))
    engine = tmp_path / f"block{backend.engine_suffix}"
    backend.build(stage_onnx, engine, STAGE_INPUTS, options)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    assert "sm_" in backend.device() and backend.version()
    with backend.load(engine, STAGE_INPUTS, STAGE_OUTPUTS, options) as runner:
        for batch in (1, 5):
            feed = stage_feed(batch, seed=batch, device="cuda")
            output = runner.infer(feed)["y"]
            assert output.is_cuda and runner.last_infer_time_s > 0
            with torch.no_grad():
                reference = block_stage(**{name: tensor.cpu() for name, tensor in feed.items()})
            assert_close(output, reference, precision)
        with pytest.raises(EngineInputError, match="batch 9"):
            runner.infer(stage_feed(9, device="cuda"))


@needs_gpu_and_pycuda
def test_engine_host_tensors_go_through_pycuda(block_stage, stage_onnx, tmp_path):
    backend, options = TensorRTBackend(), BuildOptions(min_batch=1, opt_batch=2, max_batch=4, optimization_level=1)
    engine = tmp_path / "block.plan"
    backend.build(stage_onnx, engine, STAGE_INPUTS, options)
    with backend.load(engine, STAGE_INPUTS, STAGE_OUTPUTS, options) as runner:
        for batch in (1, 3):
            feed = stage_feed(batch, seed=batch)
            output = runner.infer(feed)["y"]
            assert output.device.type == "cpu"
            with torch.no_grad():
                assert_close(output, block_stage(**feed), options.precision)
        with pytest.raises(EngineInputError, match="batch 5"):
            runner.infer(stage_feed(5))
