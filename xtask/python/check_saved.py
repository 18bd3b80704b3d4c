"""Checks models that qgraph saved: the onnx checker accepts each, and onnxruntime gives the same
outputs for the original and the saved model on random inputs.

usage: check_saved.py ORIGINAL SAVED [ORIGINAL SAVED ...]
Symbolic dims are set to 1, except `seq`, which is 48 (as the saved, folded models assume).
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_}


def feeds(model, rng):
    out = {}
    for vi in model.graph.input:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (48 if d.dim_param == "seq" else 1) for d in t.shape.dim]
        dt = DTYPES[t.elem_type]
        if dt == np.float32:
            out[vi.name] = rng.standard_normal(dims).astype(dt)
        elif vi.name == "attention_mask":
            out[vi.name] = np.ones(dims, dt)
        elif vi.name == "token_type_ids":
            out[vi.name] = np.zeros(dims, dt)
        else:
            out[vi.name] = rng.integers(0, 2 if dt == np.bool_ else 100, dims).astype(dt)
    return out


def run(path, inputs):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))


def main(args):
    rng = np.random.default_rng(0)
    for original, saved in zip(args[::2], args[1::2]):
        onnx.checker.check_model(saved, full_check=False)
        model = onnx.load(original, load_external_data=False)
        inputs = feeds(model, rng)
        want, got = run(original, inputs), run(saved, inputs)
        if sorted(want) != sorted(got):
            sys.exit(f"{saved}: outputs {sorted(got)} differ from {sorted(want)}")
        worst = 0.0
        for name, ref in want.items():
            ref = ref.astype(np.float64)
            diff = np.max(np.abs(ref - got[name].astype(np.float64))) if ref.size else 0.0
            worst = max(worst, diff / (1.0 + np.max(np.abs(ref))))
        if worst > 1e-4:
            sys.exit(f"{saved}: outputs differ from the original (relative {worst:.2e})")
        print(f"  onnx checker + onnxruntime: saved {saved.split('/')[-1]} matches the original (max relative diff {worst:.1e})")


if __name__ == "__main__":
    main(sys.argv[1:])
