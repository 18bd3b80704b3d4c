"""Prints the median wall time (ms) of onnx.load over repeated loads of one model.

usage: time_onnx_load.py MODEL RUNS
"""
import statistics
import sys
import time

import onnx

path, runs = sys.argv[1], int(sys.argv[2])
onnx.load(path)
times = []
for _ in range(runs):
    t = time.perf_counter()
    onnx.load(path)
    times.append((time.perf_counter() - t) * 1e3)
print(f"{statistics.median(times):.2f}")
