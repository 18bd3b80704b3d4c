"""Writes small ONNX models with BatchNormalization in every foldable position (after Conv,
depthwise ConvTranspose, Gemm and MatMul; before a 1x1 Conv; and one that cannot be folded), so
`cargo xtask zoo` can check qgraph's BN folding against onnxruntime.

usage: make_bn_models.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)


def init(name, shape, positive=False):
    a = rng.standard_normal(shape).astype(np.float32)
    if positive:
        a = np.abs(a) + 0.5
    return numpy_helper.from_array(a, name)


def bn(prefix, c, x, y):
    inits = [init(f"{prefix}.g", [c]), init(f"{prefix}.b", [c]), init(f"{prefix}.m", [c]), init(f"{prefix}.v", [c], True)]
    node = helper.make_node("BatchNormalization", [x] + [i.name for i in inits], [y], name=prefix, epsilon=1e-3)
    return node, inits


def save(path, nodes, inits, inputs, outputs):
    g = helper.make_graph(nodes, "bn", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def main(out):
    os.makedirs(out, exist_ok=True)
    f = TensorProto.FLOAT
    x4 = helper.make_tensor_value_info("x", f, [2, 4, 6, 6])
    # Conv → BN (backward), then BN → 1x1 Conv (forward), then ConvTranspose(depthwise) → BN.
    nodes, inits = [], [init("w1", [6, 4, 3, 3]), init("b1", [6]), init("w2", [5, 6, 1, 1]), init("wt", [5, 1, 2, 2])]
    nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    n, i = bn("bn1", 6, "c1", "n1")
    nodes.append(n), inits.extend(i)
    nodes.append(helper.make_node("Relu", ["n1"], ["r1"], name="relu"))
    n, i = bn("bn2", 6, "r1", "n2")
    nodes.append(n), inits.extend(i)
    nodes.append(helper.make_node("Conv", ["n2", "w2"], ["c2"], name="conv2"))
    nodes.append(helper.make_node("ConvTranspose", ["c2", "wt"], ["ct"], name="convt", group=5, strides=[2, 2]))
    n, i = bn("bn3", 5, "ct", "y")
    nodes.append(n), inits.extend(i)
    save(f"{out}/bn_conv.onnx", nodes, inits, [x4], [helper.make_tensor_value_info("y", f, [2, 5, 12, 12])])

    # Gemm(transB, beta) → BN, MatMul → BN, and a BN whose input has two readers (stays, affine).
    x2 = helper.make_tensor_value_info("x", f, [3, 8])
    nodes, inits = [], [init("gw", [5, 8]), init("gc", [5]), init("mw", [5, 4])]
    nodes.append(helper.make_node("Gemm", ["x", "gw", "gc"], ["g"], name="gemm", transB=1, beta=0.5))
    n, i = bn("bn4", 5, "g", "gn")
    nodes.append(n), inits.extend(i)
    nodes.append(helper.make_node("MatMul", ["gn", "mw"], ["mm"], name="matmul"))
    n, i = bn("bn5", 4, "mm", "mn")
    nodes.append(n), inits.extend(i)
    nodes.append(helper.make_node("Relu", ["mn"], ["side"], name="side"))
    n, i = bn("bn6", 4, "mn", "y")
    nodes.append(n), inits.extend(i)
    outs = [helper.make_tensor_value_info(n, f, [3, 4]) for n in ("y", "side")]
    save(f"{out}/bn_linear.onnx", nodes, inits, [x2], outs)


if __name__ == "__main__":
    main(sys.argv[1])
