"""quantkit's Python QuantSim on the committed digits model: calibrate, run, export, change a
precision; bad input raises ValueError naming the culprit."""
import json
import pathlib

import numpy as np
import pytest

import quantkit

MODELS = pathlib.Path(__file__).resolve().parents[3] / "models"
MODEL = str(MODELS / "digits_cnn.onnx")


def batches(data, size=32):
    return ({"input": data[i:i + size]} for i in range(0, len(data), size))


@pytest.fixture(scope="module")
def data():
    calib = np.load(MODELS / "digits_cnn_calib.npy")
    evaluation = np.load(MODELS / "digits_cnn_eval.npy")
    labels = np.load(MODELS / "digits_cnn_labels.npy")
    return calib, evaluation, labels


def test_w8a8_keeps_the_float_top1(data):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, config="default", param="int8", act="int8")
    sim.compute_encodings(batches(calib))
    logits = sim.run({"input": evaluation})[0]
    assert logits.dtype == np.float32 and logits.shape == (len(evaluation), 10)
    top1 = float((logits.argmax(axis=1) == labels).mean())
    # The CLI prints 0.9825 for FP32 and W8A8 on these 400 digits.
    assert top1 == pytest.approx(0.9825, abs=0.0051)


def test_export_writes_aimet_encodings_and_a_qdq_model(data, tmp_path):
    calib, _, _ = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor")
    sim.compute_encodings(batches(calib))
    sim.export(tmp_path / "out", version="1.0.0")
    enc = json.loads((tmp_path / "out" / "model.encodings").read_text())
    assert enc["version"] == "1.0.0" and enc["activation_encodings"] and enc["param_encodings"]
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0
    sim.export_qdq(tmp_path / "model_qdq.onnx")
    assert (tmp_path / "model_qdq.onnx").stat().st_size > 0


def test_a_tensor_at_int16_after_recalibration(data):
    calib, _, _ = data
    sim = quantkit.QuantSim(MODEL)
    enabled = [q for q in sim.quantizers() if q["enabled"] and q["role"] == "output"]
    tensor = enabled[0]["tensor"]
    sim.set_precision(tensor, "int16")
    sim.compute_encodings(batches(calib))
    by_name = {q["tensor"]: q for q in sim.quantizers()}
    assert by_name[tensor]["precision"] == "int16"


def test_bad_input_raises_value_error_naming_it(data):
    calib, _, _ = data
    with pytest.raises(ValueError, match="no_such.onnx"):
        quantkit.QuantSim(str(MODELS / "no_such.onnx"))
    with pytest.raises(ValueError, match="int99"):
        quantkit.QuantSim(MODEL, param="int99")
    sim = quantkit.QuantSim(MODEL)
    with pytest.raises(ValueError, match="wrong_name"):
        sim.compute_encodings([{"wrong_name": calib[:8]}])
    with pytest.raises(ValueError, match="dict"):
        sim.compute_encodings([calib[:8]])
    with pytest.raises(ValueError, match="not_a_tensor"):
        sim.set_precision("not_a_tensor", "int16")
    with pytest.raises(ValueError):
        sim.run({"input": calib[:2]})  # not calibrated yet
    with pytest.raises(ValueError, match="nope"):
        quantkit.QuantSim(MODEL, bind={"nope": 1})
    with pytest.raises(ValueError, match="not fully declared"):
        quantkit.QuantSim(MODEL, bind={"input": [0.0, 1.0]})
    with pytest.raises(ValueError, match="a number or a list"):
        quantkit.QuantSim(MODEL, bind={"input": "one"})


def test_per_layer_sensitivity_scores_every_layer(data):
    calib, _, _ = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    sim.compute_encodings(batches(calib))
    before = sim.run({"input": calib[:8]})[0]
    scores = sim.per_layer_sensitivity(batches(calib[:32]), metric="psnr")
    # The CLI's analysis of this model has 8 layers.
    assert len(scores) == 8 and all(np.isfinite(v) for v in scores.values())
    assert "stem" in scores
    # The simulation is left as it was.
    assert np.array_equal(sim.run({"input": calib[:8]})[0], before)
    worse = sim.per_layer_sensitivity(batches(calib[:32]), metric="mse", mode="disable_one")
    assert list(worse) == list(scores)
    with pytest.raises(ValueError, match="nope"):
        sim.per_layer_sensitivity(batches(calib[:32]), metric="nope")


def test_blockwise_int4_weights_export_int4_blocks(data, tmp_path):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, param="int4", act="int8")
    skipped = sim.set_blockwise_quantization_for_weights(bitwidth=4, block_size=4)
    # The stem and depthwise convolutions read one input channel each.
    assert [name for name, _ in skipped] == ["stem.weight", "depthwise.weight"]
    sim.compute_encodings(batches(calib))
    top1 = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    # The CLI prints 0.9475 for W4 blocks of 4 (A8) on these 400 digits.
    assert top1 == pytest.approx(0.9475, abs=0.0051)
    sim.export_qdq(tmp_path / "w4_blocks.onnx", prequantize_weights=True)
    assert (tmp_path / "w4_blocks.onnx").stat().st_size > 0


def test_lpbq_weights_export_in_aimets_lpbq_form(data, tmp_path):
    calib, _, _ = data
    sim = quantkit.QuantSim(MODEL, param="int4", act="int8")
    sim.set_blockwise_quantization_for_weights(bitwidth=4, block_size=4)
    assert sim.set_lpbq(8) == 2
    with pytest.raises(ValueError, match="LPBQ"):
        sim.set_lpbq(4)
    sim.compute_encodings(batches(calib))
    sim.export(tmp_path / "lpbq")
    doc = json.loads((tmp_path / "lpbq" / "model.encodings").read_text())
    lpbq = [e for e in doc["param_encodings"] if e["enc_type"] == "LPBQ"]
    assert sorted(e["name"] for e in lpbq) == ["classifier.weight", "pointwise.weight"]
    assert all(e["bw"] == 8 and e["compressed_bw"] == 4 for e in lpbq)


def test_lite_mp_flips_the_most_sensitive_layers(data):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    sim.compute_encodings(batches(calib))
    low = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    scores = sim.per_layer_sensitivity(batches(calib[:32]))
    flipped = sim.flip_layers_to_higher_precision(scores, percent_to_flip=50)
    assert len(flipped) == 4 and flipped[0] == min(scores, key=scores.get)
    sim.compute_encodings(batches(calib))
    high = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    assert high > low
    with pytest.raises(ValueError, match="int16 or float16"):
        sim.flip_layers_to_higher_precision(scores, act="int8")


def test_a_forward_pass_callback_and_a_progress_callback(data):
    calib, evaluation, _ = data

    def forward_pass(runner, samples):
        for i in range(0, samples, 32):
            runner.run({"input": calib[i:i + 32]})

    seen = []
    sim = quantkit.QuantSim(MODEL)
    sim.compute_encodings(forward_pass, len(calib), progress=seen.append)
    assert seen == [1, 2, 3, 4]
    # The same encodings as from the batches themselves.
    other = quantkit.QuantSim(MODEL)
    other.compute_encodings(batches(calib))
    assert np.array_equal(sim.run({"input": evaluation[:16]})[0], other.run({"input": evaluation[:16]})[0])
    with pytest.raises(ValueError, match="no batch"):
        sim.compute_encodings(lambda runner, args: None)

    def stop(done):
        raise RuntimeError("stopped by the user")

    with pytest.raises(RuntimeError, match="stopped by the user"):
        sim.compute_encodings(batches(calib), progress=stop)


def test_equalize_model_writes_an_equivalent_model(data, tmp_path):
    calib, _, _ = data
    report = quantkit.equalize_model(MODEL, tmp_path / "equalized.onnx")
    # depthwise → ReLU6 → pointwise is the one chain (the stem's output also feeds the residual Add).
    assert [s["layers"] for s in report["sets"]] == [["depthwise", "pointwise"]]
    assert report["clips_rewritten"]
    # The equalized model computes what the original does: W16A16 simulations of both agree.
    a = quantkit.QuantSim(MODEL, param="int16", act="int16")
    b = quantkit.QuantSim(str(tmp_path / "equalized.onnx"), param="int16", act="int16")
    for s in (a, b):
        s.compute_encodings(batches(calib))
    ya, yb = a.run({"input": calib[:16]})[0], b.run({"input": calib[:16]})[0]
    assert np.abs(ya - yb).max() < 0.05 * np.abs(ya).max()
    with pytest.raises(ValueError, match="missing.onnx"):
        quantkit.equalize_model("missing.onnx", tmp_path / "x.onnx")


def test_amp_chooses_a_plan_within_the_allowed_drop(data, tmp_path):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int8", act="int8")

    def top1(logits):
        return float((logits.argmax(axis=1) == labels).mean())

    stages = set()
    info = sim.choose_mixed_precision(
        ["w8a8", "w4a8", "w8a4", "w4a4"],
        list(batches(calib)),
        {"input": evaluation},
        top1,
        allowed_accuracy_drop=0.01,
        results_dir=tmp_path / "amp",
        progress=lambda stage, done, total: stages.add(stage),
    )
    assert info["final_score"] >= info["fp32_score"] - 0.01
    assert info["front"] and all(0 < p["relative_bitops"] <= 1 for p in info["front"])
    assert len(stages) >= 2
    assert info["final_relative_bitops"] < 1.0
    assert {g["candidate"] for g in info["groups"]} <= {"W8A8", "W4A8", "W8A4", "W4A4"}
    # The simulation is left with the chosen plan.
    assert top1(sim.run({"input": evaluation})[0]) == pytest.approx(info["final_score"])
    assert json.loads((tmp_path / "amp" / "amp_info.json").read_text())["final_score"] == info["final_score"]

    def broken(logits):
        raise KeyError("no such metric")

    with pytest.raises(KeyError, match="no such metric"):
        sim.choose_mixed_precision(["w8a8", "w4a8"], list(batches(calib)), {"input": evaluation}, broken)
    # The CLI's options: a device target makes every scored plan legal for it.
    legal = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int16", act="int16")
    info = legal.choose_mixed_precision(
        ["w16a16", "w8a16", "w8a8"], list(batches(calib)), {"input": evaluation}, top1,
        allowed_accuracy_drop=0.01, target="htp_v73", budget_search=True, search="interpolation",
    )
    assert info["final_score"] >= info["fp32_score"] - 0.01
    with pytest.raises(ValueError, match="nowhere"):
        legal.choose_mixed_precision(["w8a8", "w4a8"], [], {"input": evaluation}, top1, target="nowhere")
    with pytest.raises(ValueError, match="w3a3x"):
        sim.choose_mixed_precision(["w3a3x"], list(batches(calib)), {"input": evaluation}, top1)


def test_analyze_writes_aimet_files_and_the_report(data, tmp_path):
    calib, _, _ = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    sim.compute_encodings(batches(calib))
    seen = []
    report = sim.analyze(
        batches(calib[:32]), out_dir=tmp_path / "analysis", disable_one=True,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert ("enable one", 8, 8) in seen and ("disable one", 8, 8) in seen
    layers = [layer for layer, _ in report["enable_one"]["scores"]]
    assert len(layers) == 8 and report["disable_one"] and report["checks"]
    written = json.loads((tmp_path / "analysis" / "layer_sensitivity.json").read_text())
    assert list(written) == layers
    assert "<svg" in (tmp_path / "analysis" / "report.html").read_text()


def test_adaround_and_seq_mse_keep_w4_weights_closer_to_float(data):
    calib, evaluation, labels = data

    def top1(sim):
        return float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())

    nearest = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    nearest.compute_encodings(batches(calib))
    rounded = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    report = rounded.apply_adaround(list(batches(calib)), num_iterations=200)
    assert len(report["layers"]) >= 3
    searched = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    searched.apply_seq_mse(list(batches(calib)))
    assert top1(rounded) >= top1(nearest) and top1(searched) >= top1(nearest) - 0.01
    with pytest.raises(ValueError, match="calibration data"):
        rounded.apply_adaround([], num_iterations=10)


def test_bias_correction_and_bn_reestimation_rebuild_the_simulation(data):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int4", act="int8")
    report = sim.apply_bias_correction(list(batches(calib)))
    assert len(report["corrected"]) == 4 and not report["skipped"]
    top1 = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    # Nearest rounding gives 0.9625 here; the corrected biases 0.9725.
    assert top1 >= 0.9625
    # The digits model has no batch norm left to re-estimate.
    assert sim.reestimate_bn_stats(list(batches(calib))) == {"reestimated": [], "folded": []}
    with pytest.raises(ValueError, match="sometimes"):
        sim.apply_bias_correction(list(batches(calib)), kind="sometimes")


def test_automp_narrows_layers_while_the_score_holds(data):
    calib, evaluation, labels = data

    def top1(logits):
        return float((logits.argmax(axis=1) == labels).mean())

    sim = quantkit.QuantSim(MODEL, config="default_per_tensor", param="int8", act="int8")
    sim.compute_encodings(batches(calib))
    floor = top1(sim.run({"input": evaluation})[0]) - 0.01
    result = sim.automp("w4a4", list(batches(calib)), {"input": evaluation}, top1, floor)
    assert result["narrowed"] and result["score"] >= floor
    assert top1(sim.run({"input": evaluation})[0]) == pytest.approx(result["score"])
    assert {q["precision"] for q in sim.quantizers() if q["enabled"]} >= {"int4"}


def test_label_free_qat_recovers_w4a4(data, tmp_path):
    calib, evaluation, labels = data
    sim = quantkit.QuantSim(MODEL, config="default", param="int4", act="int4")
    sim.compute_encodings(batches(calib))
    ptq = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    report = sim.train(list(batches(calib)), epochs=30, learning_rate=0.03, mode="range_learning",
                       batch_size=20, micro_batch=10, eval_batches=[{"input": evaluation}],
                       eval_labels=labels.tolist(), checkpoint=str(tmp_path / "qat.ckpt"))
    top1 = float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean())
    assert report["epochs"][0]["score"] == pytest.approx(ptq)
    assert report["epochs"][report["best_epoch"]]["score"] == pytest.approx(top1)
    # FP32 is 0.9825 on these digits; W4A4 after calibration 0.92.
    assert top1 >= 0.9825 - 0.01
    assert (tmp_path / "qat.ckpt").exists()
    # The digits model has no batch norm to fold after training; the simulation stays as it is.
    assert sim.fold_all_batch_norms_to_scale(list(batches(calib))) == {"reestimated": [], "folded": []}
    assert float((sim.run({"input": evaluation})[0].argmax(axis=1) == labels).mean()) == top1
    with pytest.raises(ValueError, match="unknown mode"):
        sim.train(list(batches(calib)), mode="sometimes")
