"""Fetches the ONNX backend model suites that ship inside the onnx wheel, beside the node tests.

Usage: fetch_model_tests.py DEST_DIR
Downloads onnx==1.17.0 (no dependencies) with pip and extracts the `pytorch-converted`,
`pytorch-operator` and `simple` suites into DEST_DIR/<suite>/<test>/ (model.onnx and
test_data_set_*/). The `light` models (real architectures whose weights are ConstantOfShape
nodes) ship without inputs: each gets one test set, an input drawn from a seeded normal
distribution and the outputs onnxruntime computes for it, in the same layout.
"""
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

dest = sys.argv[1]
root = "onnx/backend/test/data/"
suites = ["pytorch-converted", "pytorch-operator", "simple"]
partial = dest + ".partial"
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "onnx==1.17.0", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-d", tmp],
        check=True,
    )
    wheel = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
    with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
        for name in z.namelist():
            if name.endswith("/") or not name.startswith(root):
                continue
            rel = name[len(root):]
            suite = rel.split("/", 1)[0]
            if suite in suites:
                target = os.path.join(partial, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(z.read(name))
            elif suite == "light" and rel.endswith(".onnx"):
                test = os.path.basename(rel)[: -len(".onnx")]
                folder = os.path.join(partial, "light", test)
                os.makedirs(os.path.join(folder, "test_data_set_0"), exist_ok=True)
                model_path = os.path.join(folder, "model.onnx")
                with open(model_path, "wb") as f:
                    f.write(z.read(name))
                model = onnx.load(model_path)
                rng = np.random.default_rng(0)
                sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
                feeds = {}
                for i, inp in enumerate(sess.get_inputs()):
                    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
                    x = rng.standard_normal(shape).astype(np.float32)
                    feeds[inp.name] = x
                    t = numpy_helper.from_array(x, inp.name)
                    with open(os.path.join(folder, "test_data_set_0", f"input_{i}.pb"), "wb") as f:
                        f.write(t.SerializeToString())
                for i, y in enumerate(sess.run(None, feeds)):
                    t = numpy_helper.from_array(np.asarray(y), f"output_{i}")
                    with open(os.path.join(folder, "test_data_set_0", f"output_{i}.pb"), "wb") as f:
                        f.write(t.SerializeToString())
os.replace(partial, dest)
print(f"extracted {sum(len(os.listdir(os.path.join(dest, s))) for s in os.listdir(dest))} model tests into {dest}")
