"""Writes onnxruntime's outputs beside a node test's expected data, for the tests whose expected
data in the onnx wheel disagree with onnxruntime (the interpreter's oracle).

Usage: ort_oracle.py TESTS_DIR TEST...
For each TEST and each of its test_data_set_*/ folders, runs TESTS_DIR/TEST/model.onnx on the
set's inputs and writes ort_output_<i>.pb; the conformance runner compares against those files
when they exist.
"""
import ctypes
import os
import sys

import onnx
import onnxruntime as ort
from onnx import numpy_helper

BFLOAT16 = "tensor(bfloat16)"


def raw_tensor(value, name):
    """An OrtValue as a TensorProto; bfloat16 (which numpy lacks) from its raw bits."""
    if value.data_type() != BFLOAT16:
        return numpy_helper.from_array(value.numpy(), name)
    shape = value.shape()
    count = 1
    for d in shape:
        count *= d
    bits = bytes((ctypes.c_uint8 * (2 * count)).from_address(value.data_ptr())) if count else b""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.BFLOAT16, dims=shape)
    tensor.raw_data = bits
    return tensor


tests_dir = sys.argv[1]
for test in sys.argv[2:]:
    folder = os.path.join(tests_dir, test)
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for entry in sorted(os.listdir(folder)):
        data = os.path.join(folder, entry)
        if not os.path.isdir(data):
            continue
        feeds = {
            name: numpy_helper.to_array(onnx.load_tensor(os.path.join(data, f"input_{k}.pb")))
            for k, name in enumerate(names)
        }
        binding = session.io_binding()
        for spec in session.get_inputs():
            value = feeds[spec.name]
            if spec.type == BFLOAT16:
                # The wheel stores bfloat16 inputs as their uint16 bit patterns.
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value, onnx.TensorProto.BFLOAT16)
                binding.bind_ortvalue_input(spec.name, value)
            else:
                binding.bind_cpu_input(spec.name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name)
        session.run_with_iobinding(binding)
        for k, value in enumerate(binding.get_outputs()):
            tensor = raw_tensor(value, session.get_outputs()[k].name)
            partial = os.path.join(data, f".ort_output_{k}.pb.partial")
            with open(partial, "wb") as f:
                f.write(tensor.SerializeToString())
            os.replace(partial, os.path.join(data, f"ort_output_{k}.pb"))
print(f"onnxruntime outputs written for {len(sys.argv) - 2} node tests")
