"""Prints the median wall time (ms) of onnxruntime runs of one model on given inputs.

usage: time_ort.py MODEL RUNS THREADS NAME=FILE.npy [NAME=FILE.npy ...]
One warm-up run, then RUNS timed runs; ORT_ENABLE_ALL, intra-op threads = THREADS,
inter-op threads = 1, sequential execution.
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

path, runs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
sess.run(None, feeds)
times = []
for _ in range(runs):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append((time.perf_counter() - t) * 1e3)
print(f"{statistics.median(times):.3f}")
