"""Runs an ONNX model in onnxruntime on input arrays, batch by batch.

Usage: run_model.py MODEL OUTPUT_NPY BATCH written|optimised NAME=FILE.npy [NAME=FILE.npy ...]
Every named input is fed slices of its array along axis 0; the first output of every batch is
concatenated and saved to OUTPUT_NPY. `written` disables graph optimisations, so onnxruntime
executes every node as written (the ONNX reference semantics); `optimised` lets it fuse
QuantizeLinear/DequantizeLinear groups into integer kernels. Exits non-zero (with onnxruntime's
message) if the model does not load or run.
"""
import sys

import numpy as np
import onnxruntime as ort

model, out, batch, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in sys.argv[5:])}
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
if mode == "written":
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
n = len(next(iter(feeds.values())))
parts = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
np.save(out, np.concatenate(parts))
