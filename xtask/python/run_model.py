"""Runs an ONNX model in onnxruntime on one input array, batch by batch.

Usage: run_model.py MODEL INPUT_NPY OUTPUT_NPY [BATCH] [written|optimised]
The model's first input is fed slices of INPUT_NPY along axis 0; the first output of every batch
is concatenated and saved to OUTPUT_NPY. `written` (default) disables graph optimisations, so
onnxruntime executes every node as written (the ONNX reference semantics); `optimised` lets it
fuse QuantizeLinear/DequantizeLinear groups into integer kernels. Exits non-zero (with
onnxruntime's message) if the model does not load or run.
"""
import sys

import numpy as np
import onnxruntime as ort

model, inp, out = sys.argv[1], sys.argv[2], sys.argv[3]
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
mode = sys.argv[5] if len(sys.argv) > 5 else "written"
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
if mode == "written":
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
x = np.load(inp)
np.save(out, np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]))
