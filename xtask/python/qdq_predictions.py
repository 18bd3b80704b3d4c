"""Outputs of the zoo's int8 QDQ MobileNetV2 under onnxruntime, one image at a time.

Usage: qdq_predictions.py ZOO_DIR OUT_NPY
Saves the uint8 [500, 1001] outputs with graph optimisations disabled (onnxruntime executes each
QuantizeLinear/DequantizeLinear/Conv as written: the ONNX reference semantics) to OUT_NPY, and
prints the 500 predictions (label offset removed) with ORT_ENABLE_ALL (QDQ groups fused into
integer kernels), space separated.
"""
import sys

import numpy as np
import onnxruntime as ort

zoo, out = sys.argv[1], sys.argv[2]
images = np.load(f"{zoo}/data/imagenet500_even_u8_nchw.npy")


def run(level):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(
        f"{zoo}/models/mobilenetv2_keras_int8_qdq.onnx", opts, providers=["CPUExecutionProvider"]
    )
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))])


np.save(out, run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
fused = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
print(" ".join(str(int(np.argmax(r)) - 1) for r in fused))
