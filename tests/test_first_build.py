"""The first build is fast (torchscript exporter, torch on one thread while tracing) and answers
exactly what a dynamo-exported build answers once onnxruntime has optimised the graphs."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
from conftest import needs_dynamo

from prism_trt.engines import BuildOptions, get_backend
from prism_trt.export.build import config_plans
from prism_trt.export.onnx_export import default_exporter, export_stage
from prism_trt.export.stages import example_feed, rank_stages


def test_the_default_exporter_is_torchscript():
    assert default_exporter() == "torchscript"


def test_a_first_mnist_build_at_p2_with_the_default_crs_costs_seconds_of_cpu(mnist_dir, tmp_path):
    """CPU time, not wall time: the wall time depends on what else runs on the machine. The
    dynamo exporter took ~130 s of CPU here, the torchscript one with torch on one thread ~5 s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "build", "--checkpoint",
                             str(mnist_dir / "vit_mnist.pt"), "--ranks", "2", "--out", str(tmp_path / "engines"),
                             "--json"], capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["stages"]) == 69 and all(stage["exported"] and stage["built"] for stage in report["stages"])
    assert "--cr 9.9 -> L=3, prism-cr8.33" in result.stderr  # the default CRs round on this model
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 40, f"the first build took {cpu:.1f} s of CPU"


@needs_dynamo
def test_both_exporters_give_the_same_engine_answers(mnist_model, tmp_path):
    spec = mnist_model.spec
    plan = config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [4.95], [])[-1].plan
    backend, options = get_backend("onnxruntime", "cpu", 1), BuildOptions()
    stages = rank_stages(mnist_model, plan, 0)
    for stage, module in (stages[0], stages[1], stages[-1]):  # embed, a block, the head
        answers = []
        for exporter in ("torchscript", "dynamo"):
            onnx_path = tmp_path / f"{exporter}-{stage.name}.onnx"
            engine_path = onnx_path.with_suffix(backend.engine_suffix)
            export_stage(module, stage, onnx_path, exporter)
            backend.build(onnx_path, engine_path, list(stage.inputs), options)
            with backend.load(engine_path, list(stage.inputs), list(stage.outputs), options) as runner:
                answers.append({name: tensor.detach().cpu().numpy().copy() for name, tensor in
                                runner.infer(example_feed(stage, 5, seed=7, module=module)).items()})
        for name in answers[0]:
            assert np.array_equal(answers[0][name], answers[1][name]), f"{stage.name}: {name} differs"
