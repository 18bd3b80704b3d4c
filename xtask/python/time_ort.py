"""Times onnxruntime runs of one model on given inputs, on request, for interleaved comparisons.

usage: time_ort.py MODEL THREADS NAME=FILE.npy [NAME=FILE.npy ...]
Builds the session (ORT_ENABLE_ALL, intra-op threads = THREADS, inter-op threads = 1, sequential
execution), runs it once to warm up and prints "ready". Then, for every line "N" read on standard
input, runs once more untimed (the caches are cold after the other contender's turn), then N
timed runs, and prints their wall times (ms) on one line; stops at end of input.
"""
import sys
import time

import numpy as np
import onnxruntime as ort

path, threads = sys.argv[1], int(sys.argv[2])
feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
sess.run(None, feeds)
print("ready", flush=True)
for line in sys.stdin:
    sess.run(None, feeds)
    times = []
    for _ in range(int(line)):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    print(" ".join(f"{t:.4f}" for t in times), flush=True)
