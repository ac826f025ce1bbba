"""The ONNX format prism-trt writes: an opset every supported runtime implements, and the lowest IR
version that opset allows, for every file (stages, the monolithic model, fp16 copies).

Why not what the libraries default to: the ``onnx`` package stamps the newest IR version it knows
(IR 14 with onnx 1.23) and onnxruntime refuses any IR version newer than its own ("Unsupported model
IR version: 14, max supported IR version: 13" from onnxruntime 1.31), while boards run older
runtimes still (JetPack 6: onnxruntime-gpu 1.18-1.20, TensorRT 10.3). The IR version only says
which file-format features a file may use; a file that uses none beyond those of its opset's IR
version loads in every runtime that implements the opset. So the IR version is *derived* from the
opsets a file imports, and the opset is the smaller of :data:`PREFERRED_OPSET` and what the
runtime that will load the files implements: probed from the installed onnxruntime (it refuses
what it cannot load, with a clear error), and from :data:`RUNTIME_LIMITS` for TensorRT and for
runtimes on other machines (the JetPack 6 stacks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import ModelProto, helper

from ..errors import PrismError

#: Our graphs need LayerNormalization (opset 17); 18 is what both exporters write natively.
PREFERRED_OPSET = 18
MIN_OPSET = 17

#: runtime -> (major, minor) -> (max IR version, max ai.onnx opset) it loads, from the onnxruntime
#: compatibility table and TensorRT's support matrices; a version between two rows gets the lower
#: row's limits. Probed here: onnxruntime 1.18.0 loads IR 10 / opset 21 and refuses IR 11 / opset 22.
RUNTIME_LIMITS: dict[str, dict[tuple[int, int], tuple[int, int]]] = {
    "onnxruntime": {(1, 14): (8, 18), (1, 15): (9, 19), (1, 17): (9, 20), (1, 18): (10, 21), (1, 21): (10, 22),
                    (1, 22): (11, 22)},
    "tensorrt": {(8, 6): (8, 17), (10, 0): (9, 20)},
}

#: The JetPack 6 stacks the board guide targets (NVIDIA's release notes; not run by this project).
JETPACK6 = {
    "6.0": {"python": "3.10", "cuda": "12.2", "tensorrt": "8.6.2", "onnxruntime-gpu": "1.18", "torch": "2.3"},
    "6.1": {"python": "3.10", "cuda": "12.6", "tensorrt": "10.3.0", "onnxruntime-gpu": "1.19-1.20", "torch": "2.5"},
    "6.2": {"python": "3.10", "cuda": "12.6", "tensorrt": "10.3.0", "onnxruntime-gpu": "1.20", "torch": "2.5"},
}


class OnnxFormatError(PrismError, ValueError):
    """A runtime too old for the opset our graphs need, or a file in a format it cannot load."""


@dataclass(frozen=True)
class OnnxFormat:
    """The opset stages are exported at and the IR version files are stamped with."""

    opset: int
    ir_version: int

    def to_dict(self) -> dict:
        return {"opset": self.opset, "ir_version": self.ir_version}


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def runtime_limits(runtime: str, version: str) -> tuple[int, int]:
    """(max IR version, max opset) of ``runtime`` at ``version`` ("1.18.0", "10.3.0.26")."""
    table = RUNTIME_LIMITS[runtime]
    wanted = _major_minor(version)
    known = [key for key in sorted(table) if key <= wanted]
    if not known:
        oldest = ".".join(map(str, min(table)))
        raise OnnxFormatError(f"{runtime} {version} is older than the oldest version prism-trt supports "
                              f"({oldest}); upgrade it")
    return table[known[-1]]


@functools.lru_cache(maxsize=1)
def probe_onnxruntime_limits() -> tuple[int, int]:
    """(max IR version, max opset) the installed onnxruntime loads, found by loading a one-node model."""
    import onnxruntime as ort
    from onnx import TensorProto

    def loads(ir_version: int, opset: int) -> bool:
        value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir_version
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own exception types for an unsupported format
            return False
        return True

    newest_opset = onnx.defs.onnx_opset_version()
    max_ir = next((ir for ir in range(onnx.IR_VERSION, 2, -1) if loads(ir, MIN_OPSET)), 0)
    max_opset = next((op for op in range(newest_opset, 6, -1) if loads(max_ir, op)), 0)
    return max_ir, max_opset


def format_for(runtime: str, version: str | None = None) -> OnnxFormat:
    """The format to write for files that ``runtime`` will load: the installed onnxruntime when
    ``version`` is None, else that version (by the table)."""
    if runtime == "onnxruntime" and version is None:
        max_ir, max_opset = probe_onnxruntime_limits()
        version = "installed"
    else:
        max_ir, max_opset = runtime_limits(runtime, version)
    opset = min(PREFERRED_OPSET, max_opset)
    if opset < MIN_OPSET:
        raise OnnxFormatError(f"{runtime} {version} implements ONNX opset {max_opset}; prism-trt's stages need "
                              f"opset {MIN_OPSET} or newer (LayerNormalization)")
    ir_version = minimal_ir_version([helper.make_opsetid("", opset)])
    if ir_version > max_ir:
        raise OnnxFormatError(f"{runtime} {version} loads IR version {max_ir} at most, "
                              f"opset {opset} needs {ir_version}")
    return OnnxFormat(opset, ir_version)


def minimal_ir_version(opset_imports) -> int:
    """The lowest IR version that allows these opset imports (domains onnx does not know are ignored)."""
    return helper.find_min_ir_version_for(list(opset_imports), ignore_unknown=True)


def _used_domains(model: ModelProto) -> set[str]:
    """Operator domains the model's nodes use, in the graph, its subgraphs and its functions."""
    domains = {""}

    def visit(nodes) -> None:
        for node in nodes:
            domains.add(node.domain)
            for attribute in node.attribute:
                for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        domains.add(function.domain)
        visit(function.node)
    return domains


def stamp_ir_version(model: ModelProto) -> ModelProto:
    """Drop opset imports no node uses, then set ``model.ir_version`` to the lowest the remaining
    opsets allow (in place; returns ``model``). onnxruntime's optimised models import every domain
    it knows (ai.onnx.ml 5 alone demands IR 10), whether used or not."""
    used = _used_domains(model)
    kept = [entry for entry in model.opset_import if entry.domain in used or entry.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = minimal_ir_version(model.opset_import)
    return model


def save_onnx(model: ModelProto, path: Path, external_data: bool = False) -> None:
    """Save with the lowest IR version the model's opsets allow, then run the full checker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp_ir_version(model)
    onnx.save_model(model, str(path), save_as_external_data=external_data,
                    location=f"{path.name}.data" if external_data else None)
    onnx.checker.check_model(str(path), full_check=True)


def file_format(path: Path) -> OnnxFormat:
    """The (ai.onnx opset, IR version) a file on disk declares."""
    model = onnx.load(str(path), load_external_data=False)
    opsets = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return OnnxFormat(max(opsets) if opsets else 0, model.ir_version)
