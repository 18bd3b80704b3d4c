"""Quantizes a float model with onnxruntime's quantize_static from a TensorQuantOverrides plan
(as `qmix ... --qdq` writes it, types by name) and compares the precisions of the result with
the project's own QDQ export of the same plan, tensor by tensor.

Usage: overrides_roundtrip.py FLOAT_MODEL OVERRIDES_JSON OUR_QDQ_MODEL ORT_QDQ_OUT INPUT=CALIB.npy
A tensor's precisions are the zero-point types along its QuantizeLinear/DequantizeLinear chain
(two for a converted tensor). Prints one JSON line: tensors compared, equal, the first
differences, constants onnxruntime leaves in float (Clip's bounds) and tensors it quantized
beyond the plan.
"""
import json
import sys
from collections import defaultdict

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

float_model, overrides_path, ours_path, out_path, feed = sys.argv[1:6]
name, calib_path = feed.split("=", 1)
calib = np.load(calib_path)


def typed(entry):
    entry = dict(entry)
    if "quant_type" in entry:
        entry["quant_type"] = QuantType[entry["quant_type"]]
    if "scale" in entry:
        entry["scale"] = np.array(entry["scale"], dtype=np.float32)
    if "zero_point" in entry and "quant_type" in entry:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(entry["quant_type"].tensor_type)
        entry["zero_point"] = np.array(entry["zero_point"], dtype=dtype)
    if "convert" in entry:
        convert = typed(entry["convert"])
        if "recv_nodes" in convert:
            convert["recv_nodes"] = set(convert["recv_nodes"])
        entry["convert"] = convert
    return entry


with open(overrides_path) as f:
    overrides = {t: [typed(e) for e in entries] for t, entries in json.load(f).items()}
per_channel = any("axis" in entries[0] for entries in overrides.values())


class Reader(CalibrationDataReader):
    def __init__(self):
        self.rows = iter(range(len(calib)))

    def get_next(self):
        i = next(self.rows, None)
        return None if i is None else {name: calib[i : i + 1]}


quantize_static(
    float_model,
    out_path,
    Reader(),
    quant_format=QuantFormat.QDQ,
    activation_type=QuantType.QUInt8,
    weight_type=QuantType.QInt8,
    per_channel=per_channel,
    extra_options={"TensorQuantOverrides": overrides, "QDQKeepRemovableActivations": True},
)


def precisions(model):
    """tensor -> sorted zero-point type names along its Q/DQ chain."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers = defaultdict(list)
    producer = {}
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
        for o in n.output:
            producer[o] = n

    def zp_type(n):
        zp = n.input[2] if len(n.input) > 2 else ""
        return onnx.TensorProto.DataType.Name(inits[zp].data_type) if zp in inits else "UINT8"

    out = defaultdict(list)
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            source = producer.get(n.input[0])
            if source is not None and source.op_type == "DequantizeLinear":
                continue  # a convert, reached from its chain's start
            tensor, q = n.input[0], n
            while q is not None:
                out[tensor].append(zp_type(q))
                dq = [r for r in readers[q.output[0]] if r.op_type == "DequantizeLinear"]
                nxt = [r for d in dq for r in readers[d.output[0]] if r.op_type == "QuantizeLinear"]
                q = nxt[0] if nxt else None
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            tensor = n.input[0]
            for suffix in ("_quantized",):
                if tensor.endswith(suffix):
                    tensor = tensor[: -len(suffix)]
            out[tensor].append(zp_type(n))
    return {t: sorted(set(v)) for t, v in out.items()}


ours = precisions(onnx.load(ours_path))
theirs = precisions(onnx.load(out_path))
constants = {i.name for i in onnx.load(float_model).graph.initializer}
# onnxruntime leaves some constant inputs in float (Clip's bounds); every other tensor must match.
unquantized = sorted(t for t in ours if t not in theirs and t in constants)
diffs = [(t, p, theirs.get(t)) for t, p in ours.items() if theirs.get(t) != p and t not in unquantized]
print(
    json.dumps(
        {
            "compared": len(ours),
            "equal": len(ours) - len(diffs) - len(unquantized),
            "differences": diffs[:5],
            "constants_left_in_float": len(unquantized),
            "extra_in_onnxruntime": len(set(theirs) - set(ours)),
            "types": sorted({x for p in ours.values() for x in p}),
        }
    )
)
