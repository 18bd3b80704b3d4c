"""Fetches the ONNX backend node tests that ship inside the onnx wheel.

Usage: fetch_node_tests.py DEST_DIR
Downloads onnx==1.17.0 (no dependencies) with pip and extracts onnx/backend/test/data/node/* into
DEST_DIR (one folder per test: model.onnx and test_data_set_*/{input,output}_*.pb).
"""
import os
import subprocess
import sys
import tempfile
import zipfile

dest = sys.argv[1]
prefix = "onnx/backend/test/data/node/"
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "onnx==1.17.0", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-d", tmp],
        check=True,
    )
    wheel = next(f for f in os.listdir(tmp) if f.endswith(".whl"))
    partial = dest + ".partial"
    with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = os.path.join(partial, name[len(prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(z.read(name))
    os.replace(partial, dest)
print(f"extracted {len(os.listdir(dest))} node tests into {dest}")
