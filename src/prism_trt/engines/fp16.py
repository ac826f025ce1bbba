"""An fp16 copy of an fp32 ONNX file: what fp16 engines are built from where the runtime computes
in exactly the types the file declares (TensorRT 11+ strongly typed networks; onnxruntime's CPU and
CUDA execution providers).

TensorRT 11 dropped the FP16 builder flag and onnxruntime's CUDA EP has none.
:func:`cast_onnx_to_fp16` makes every float tensor inside the graph fp16
(initializers, Constant / ConstantOfShape values, Cast targets, float ``dtype`` attributes) and
keeps the graph's float32 inputs and outputs, with Cast nodes at the boundary, so callers feed and
read the same float32 tensors whether an engine was built in fp32 or fp16. Pure onnx: runs and is
tested on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

from .base import EngineBuildError
from .onnx_format import save_onnx

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
# (op, input index) slots the ONNX spec types as float32 only: their producers stay float32.
FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
# Protobuf refuses to serialize a message over 2 GiB; larger models keep their weights beside the file.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26


def _to_fp16(tensor: TensorProto) -> TensorProto:
    # Saturate instead of overflowing to inf: one huge weight should not poison a whole layer.
    values = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(values, tensor.name)


def _float32_only_names(nodes: Iterable[NodeProto]) -> set[str]:
    names = set()
    for node in nodes:
        for op, index in FLOAT32_ONLY_INPUTS:
            if node.op_type == op and len(node.input) > index and node.input[index]:
                names.add(node.input[index])
    return names


def _convert_node(node: NodeProto, keep_float32: set[str]) -> None:
    """Retype one node's float constants and float type attributes to fp16, recursing into subgraphs."""
    if any(name in keep_float32 for name in node.output):
        return
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        # Without a value ConstantOfShape makes float32 zeros; say fp16 zeros explicitly.
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
    for index, attr in enumerate(node.attribute):
        if attr.type == AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16(attr.t))
        elif attr.type == AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
            node.attribute[index].CopyFrom(helper.make_attribute("value", _to_fp16(numpy_helper.from_array(values))))
        elif attr.type == AttributeProto.GRAPH:
            _convert_body(attr.g, retype_io=True)
        elif attr.type == AttributeProto.GRAPHS:
            for graph in attr.graphs:
                _convert_body(graph, retype_io=True)
    if node.op_type in ("RandomNormal", "RandomUniform") and not any(a.name == "dtype" for a in node.attribute):
        node.attribute.append(helper.make_attribute("dtype", FLOAT16))


def _convert_body(graph: GraphProto, retype_io: bool) -> None:
    """fp16 constants and casts in a graph, its initializers too.

    The main graph keeps its float32 inputs and outputs (see :func:`_cast_boundaries`); subgraph
    (If / Loop / Scan body) inputs and outputs are retyped (``retype_io``) because their values
    come from and go to the already-converted outer graph.
    """
    keep_float32 = _float32_only_names(graph.node)
    if retype_io:
        for value in [*graph.input, *graph.output]:
            if value.type.tensor_type.elem_type == FLOAT:
                value.type.tensor_type.elem_type = FLOAT16
    graph_inputs = {value.name for value in graph.input}
    for index, tensor in enumerate(graph.initializer):
        # An initializer named like a graph input is only its default value: it keeps the input's type.
        if tensor.data_type == FLOAT and tensor.name not in keep_float32 and tensor.name not in graph_inputs:
            graph.initializer[index].CopyFrom(_to_fp16(tensor))
    for node in graph.node:
        _convert_node(node, keep_float32)
    del graph.value_info[:]  # stale float32 annotations; shape inference writes them again


def _rename_uses(graph: GraphProto, old: str, new: str, outputs_too: bool) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        if outputs_too:
            for index, name in enumerate(node.output):
                if name == old:
                    node.output[index] = new
        for attr in node.attribute:
            # Subgraphs may read outer-scope values by name.
            for body in [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs):
                _rename_uses(body, old, new, outputs_too=False)


def _unique_name(base: str, taken: set[str]) -> str:
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def _all_names(graph: GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _cast_boundaries(graph: GraphProto) -> None:
    """Cast float32 graph inputs to fp16 on entry and fp16 results back to float32 on exit."""
    taken = _all_names(graph)
    entry, exit_ = [], []
    input_names = {value.name for value in graph.input}
    for value in graph.input:
        if value.type.tensor_type.elem_type != FLOAT:
            continue
        inside = _unique_name(f"{value.name}_fp16", taken)
        _rename_uses(graph, value.name, inside, outputs_too=False)
        entry.append(helper.make_node("Cast", [value.name], [inside], to=FLOAT16,
                                      name=_unique_name(f"cast_in_{value.name}", taken)))
    for value in graph.output:
        # An input passed straight through is still float32; nothing to cast.
        if value.type.tensor_type.elem_type != FLOAT or value.name in input_names:
            continue
        inside = _unique_name(f"{value.name}_fp16", taken)
        _rename_uses(graph, value.name, inside, outputs_too=True)
        for tensor in graph.initializer:
            if tensor.name == value.name:
                tensor.name = inside
        exit_.append(helper.make_node("Cast", [inside], [value.name], to=FLOAT,
                                      name=_unique_name(f"cast_out_{value.name}", taken)))
    nodes = entry + list(graph.node) + exit_
    del graph.node[:]
    graph.node.extend(nodes)


def cast_onnx_to_fp16(src: Path, dst: Path) -> None:
    """Write to ``dst`` an fp16 copy of the fp32 ONNX file ``src`` whose inputs and outputs stay float32.

    The copy is shape-inferred (strict, with type checks) and passes ``onnx.checker`` with
    ``full_check``; any float32 / fp16 mix the conversion missed is reported here rather than by
    TensorRT's parser.
    """
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _convert_body(model.graph, retype_io=False)
    for function in model.functions:
        keep_float32 = _float32_only_names(function.node)
        for node in function.node:
            _convert_node(node, keep_float32)
    _cast_boundaries(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        raise EngineBuildError(f"the fp16 copy of {src} is not type-consistent ({error}); the graph likely holds an "
                         f"op whose float32-only input cast_onnx_to_fp16 does not know. Build with "
                         f"--precision fp32 or tf32, or extend FLOAT32_ONLY_INPUTS in {__file__}.") from error
    # Written with the lowest IR version its opsets allow, like every file prism-trt writes.
    save_onnx(model, dst, external_data=model.ByteSize() > PROTOBUF_LIMIT_BYTES)
