"""Builds that hold on other machines: the ONNX format every supported runtime loads, precision as a
build option per backend, reduced-precision accuracy, and verification with other CPU kernels."""

import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import TWO_THREADS, assert_close, build_engines, random_model, small_spec
from tf32_emulation import TF32Matmuls, round_to_tf32

from prism_trt.cli import main
from prism_trt.core import make_partition_plan, make_segment_plan, simulate
from prism_trt.engines import BuildOptions, Manifest
from prism_trt.engines.onnx_format import (
    JETPACK6,
    RUNTIME_LIMITS,
    OnnxFormat,
    OnnxFormatError,
    file_format,
    format_for,
    probe_onnxruntime_limits,
    runtime_limits,
)
from prism_trt.engines.ort import OnnxRuntimeBackend
from prism_trt.engines.trt import TensorRTBackend
from prism_trt.runtime import load_chain, run_chains_in_process
from prism_trt.runtime.request import InferenceRequest

MNIST_CORRECT = 9721  # the shipped checkpoint at fp32, P=1 (test_mnist.py)
OLDEST_ONNXRUNTIME = min(RUNTIME_LIMITS["onnxruntime"])


def test_onnx_format_for_supported_runtimes():
    assert format_for("onnxruntime", "1.18.0") == OnnxFormat(opset=18, ir_version=8)
    for release, stack in JETPACK6.items():
        fmt = format_for("tensorrt", stack["tensorrt"])
        assert fmt.opset <= 18 and fmt.ir_version == 8, release
    with pytest.raises(OnnxFormatError, match="older than the oldest version prism-trt supports"):
        format_for("onnxruntime", "1.10.0")
    # The installed runtime, probed, loads at least what the table promises for its version.
    probed_ir, probed_opset = probe_onnxruntime_limits()
    table_ir, table_opset = runtime_limits("onnxruntime", ort.__version__)
    assert probed_ir >= table_ir and probed_opset >= table_opset
    assert format_for("onnxruntime") == OnnxFormat(opset=18, ir_version=8)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_file_a_build_writes_loads_in_the_oldest_runtime(tmp_path, precision):
    model = random_model(small_spec(img=32, depth=2))
    backend = OnnxRuntimeBackend("cpu", threads=1)
    build_engines(model, tmp_path, 2, [3.0], backend=backend, precision=precision)
    oldest_ir, oldest_opset = RUNTIME_LIMITS["onnxruntime"][OLDEST_ONNXRUNTIME]
    files = sorted(tmp_path.rglob("*.onnx"))
    assert len(files) > 10  # stages, engines (fp16 copies / optimised graphs), the monolithic model
    for path in files:
        fmt = file_format(path)
        assert fmt.ir_version <= oldest_ir and fmt.opset <= oldest_opset, (path, fmt)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # and the installed one loads it
    manifest = Manifest.load(tmp_path / "rank1")
    assert manifest.export["opset"] == 18 and manifest.export["ir_version"] == 8
    assert manifest.build_options.precision == precision


def test_precision_per_backend():
    cpu, cuda, trt_ep = (OnnxRuntimeBackend(provider) for provider in ("cpu", "cuda", "tensorrt"))
    assert cpu.resolve_precision(None) == "fp32" and cpu.resolve_precision("fp16") == "fp16"
    with pytest.raises(ValueError, match="TF32 is a math mode of NVIDIA GPUs"):
        cpu.resolve_precision("tf32")
    assert cuda.default_precision() == "tf32" and not cuda.unsupported_precisions()
    with pytest.raises(ValueError, match="no switch for TensorRT's default TF32"):
        trt_ep.resolve_precision("fp32")
    assert TensorRTBackend().default_precision() == "tf32" and not TensorRTBackend().unsupported_precisions()
    # The CUDA EP's TF32 switch follows the precision (it defaults to on); fp16 reaches the TensorRT EP.
    for precision, tf32 in (("fp32", 0), ("tf32", 1), ("fp16", 0)):
        options = BuildOptions(precision=precision)
        cuda_options = dict(cuda.providers([], options)[0][1])
        assert cuda_options["use_tf32"] == tf32
        assert dict(trt_ep.providers([], options)[0][1])["trt_fp16_enable"] == (precision == "fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, fp16"):
        BuildOptions(precision="int8")


def test_build_cli_refuses_an_unavailable_precision(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "vit_tiny_patch16_224", "--ranks", "2", "--cr", "9.9",
                                       "--precision", "tf32", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "precision tf32 is not available with onnxruntime on cpu" in result.output
    assert not any(tmp_path.iterdir())  # refused before anything was exported


def test_fp16_build_is_verified_and_keeps_mnist_accuracy(mnist_model, mnist_dir, tmp_path):
    """fp16 engines (onnxruntime CPU EP): every stage verified at fp16 with the fp32 export checked
    beside it, and the shipped model within 10 images of its fp32 accuracy."""
    from prism_trt.data import MnistTestSet

    build_engines(mnist_model, tmp_path, 1, source={"checkpoint": "vit_mnist.pt"}, threads=2, precision="fp16")
    manifest = Manifest.load(tmp_path / "rank0")
    for stage in [*manifest.configs[0].stages, manifest.monolithic]:
        verification = stage.verification
        assert verification.engine.precision == "fp16" and verification.engine.passed
        assert verification.export.precision == "fp32" and verification.export.passed
    correct = 0
    with load_chain(tmp_path / "rank0", "local", options=TWO_THREADS) as chain:
        for images, labels in MnistTestSet(mnist_dir).batches(500):
            correct += int((run_chains_in_process([chain], InferenceRequest.of(chain.manifest.model, images))
                            .argmax(-1) == labels).sum())
    assert abs(correct - MNIST_CORRECT) <= 10, correct


def test_tf32_emulated_mnist_keeps_accuracy_within_tolerance(mnist_model, mnist_dir):
    """TF32 matmuls emulated on the CPU: P=2 CR 5 logits within the tf32 tolerance of fp32, and the
    P=1 accuracy within 10 images (the engines themselves: test_cuda.py, on a GPU)."""
    from prism_trt.data import MnistTestSet

    assert torch.equal(round_to_tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11])), torch.tensor([1.0, 1 + 2**-9]))
    images, _ = next(MnistTestSet(mnist_dir, limit=256).batches(256))
    plan = make_segment_plan(make_partition_plan(50, 1, 2), cr=5.0)
    with torch.no_grad():
        fp32 = simulate(mnist_model, images, plan)
        with TF32Matmuls():
            tf32 = simulate(mnist_model, images, plan)
    assert not torch.equal(fp32, tf32)  # the emulation did round
    assert_close(tf32, fp32, "tf32", name="P=2 CR 5 logits")
    correct = 0
    with torch.no_grad(), TF32Matmuls():
        for batch, labels in MnistTestSet(mnist_dir).batches(1000):
            correct += int((mnist_model(batch).argmax(-1) == labels).sum())
    assert abs(correct - MNIST_CORRECT) <= 10, correct


@pytest.mark.timeout(300)
def test_build_verifies_with_avx2_kernels(mnist_dir, tmp_path):
    """As on an AVX2-only host: the torch reference's kernels capped to AVX2 (ATen, oneDNN, MKL)
    change its summation order; the build's verification must still pass, with margin."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "build", "--checkpoint",
                             str(mnist_dir / "vit_mnist.pt"), "--ranks", "2", "--cr", "5", "--exporter", "torchscript",
                             "--out", str(tmp_path), "--quiet"], capture_output=True, text=True, env=env, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    used = [stage.verification.engine.used for rank in (0, 1)
            for config in Manifest.read(tmp_path / f"rank{rank}").configs for stage in config.stages]
    assert max(used) < 0.25, max(used)  # at least a 4x margin left on the worst stage


def test_verification_failure_names_stage_and_precision(tmp_path, monkeypatch):
    """A wrong engine is refused at build time with the comparison report, not listed."""
    from prism_trt.export.verify import VerificationError

    model = random_model(small_spec(img=32, depth=2))
    backend = OnnxRuntimeBackend("cpu", threads=1)
    real_build = backend.build

    def corrupting_build(onnx_path, engine_path, inputs, options):
        real_build(onnx_path, engine_path, inputs, options)
        if Path(engine_path).name.startswith("block_01"):  # scale the block's output by 1.001
            model = onnx.load(str(engine_path))
            out = model.graph.output[0].name
            for node in model.graph.node:
                node.input[:] = [f"{out}_raw" if name == out else name for name in node.input]
                node.output[:] = [f"{out}_raw" if name == out else name for name in node.output]
            factor = onnx.helper.make_tensor("factor", onnx.TensorProto.FLOAT, [], [1.001])
            model.graph.node.extend([onnx.helper.make_node("Constant", [], ["factor"], value=factor),
                                     onnx.helper.make_node("Mul", [f"{out}_raw", "factor"], [out])])
            onnx.save(model, str(engine_path))

    monkeypatch.setattr(backend, "build", corrupting_build)
    with pytest.raises(VerificationError, match=r"rank0/local/block_01\.ort\.onnx .*fp32"):
        build_engines(model, tmp_path, 1, backend=backend)
