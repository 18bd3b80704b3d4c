"""The quantkit Python module on a zoo classifier: W8A8 QuantSim (default config, min-max),
calibrated on CALIB.npy in batches of 32 and run on EVAL.npy in batches of 50.

Usage: quantkit_zoo.py MODEL CALIB.npy EVAL.npy OUT.npy
Saves the simulated logits to OUT.npy and prints the calibration and evaluation seconds.
"""
import sys
import time

import numpy as np

import quantkit

model, calib_path, eval_path, out = sys.argv[1:5]
calib, evaluation = np.load(calib_path), np.load(eval_path)
sim = quantkit.QuantSim(model, config="default", param="int8", act="int8", scheme="min_max")
started = time.perf_counter()
sim.compute_encodings({"input": calib[i:i + 32]} for i in range(0, len(calib), 32))
calibrated = time.perf_counter()
logits = np.concatenate([sim.run({"input": evaluation[i:i + 50]})[0] for i in range(0, len(evaluation), 50)])
done = time.perf_counter()
np.save(out, logits)
print(f"{calibrated - started:.2f} {done - calibrated:.2f}")
