"""A float .tflite as a source: published-file forms rewritten to plain float32, what edgeq cannot
quantize refused in one line before any slow step, and the result quantized end to end through
edgeq.quantize with the int8 constraints enforced and the model run under XNNPACK."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from edgeq.errors import ModelFormatError
from edgeq.int8_constraints import enforce, violations
from edgeq.precision import Scheme
from edgeq.quantize import QuantizeRequest, quantize
from edgeq.sources import load_source
from edgeq.sources.tflite import load_tflite
from edgeq.quiet import quiet_native
from edgeq.tflite_model import read_model
from edgeq.fidelity import run_model
from edgeq.verify import check_runs
from tests.conftest import signed_module


def _keras(tf):
    tf.keras.utils.set_random_seed(21)
    L = tf.keras.layers
    x = tf.keras.Input((12, 12, 3), name="image")
    h = L.MaxPool2D()(L.Conv2D(8, 3, padding="same", activation="relu")(x))
    h = L.Concatenate()([L.Conv2D(8, 1)(h), L.DepthwiseConv2D(3, padding="same")(h)])
    return tf.keras.Model(x, L.Dense(6)(L.GlobalAveragePooling2D()(h)))


def _convert(tf, keras, fp16=False) -> bytes:
    c = tf.lite.TFLiteConverter.from_keras_model(keras)
    if fp16:
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.target_spec.supported_types = [tf.float16]
    with quiet_native():
        return bytes(c.convert())


def _no_signature(model: bytes) -> bytes:
    m = te.load(model)
    m.signatureDefs = []
    return te.pack(m)


def _samples(n, seed, name="image"):
    rng = np.random.default_rng(seed)
    return [{name: rng.uniform(0, 1, (1, 12, 12, 3)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def files(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("tflite_sources")
    keras = _keras(tf)
    paths = {"fp16": d / "fp16_nosig.tflite", "float": d / "float.tflite"}
    paths["fp16"].write_bytes(_no_signature(_convert(tf, keras, fp16=True)))
    paths["float"].write_bytes(_convert(tf, keras))
    return paths


def test_fp16_file_without_signature_loads_as_plain_float(files):
    before = files["fp16"].read_bytes()
    src = load_source(files["fp16"])
    assert src.format == "tflite" and files["fp16"].read_bytes() == before  # input untouched
    info = read_model(src.float_tflite)
    assert "DEQUANTIZE" not in {op.name for op in info.ops}
    assert "float16" not in {t.dtype for op in info.ops for t in op.inputs + op.outputs}
    assert src.notes[0].startswith("5 float16 weight(s) behind DEQUANTIZE were folded")
    assert any("SignatureDef" in n for n in src.notes)
    # the added signature names the input by its tensor name
    assert [(s.name, s.shape[1:], s.dtype) for s in src.inputs] == [("serving_default_image:0", (12, 12, 3), "float32")]


def test_fp16_file_end_to_end_int8(files):
    """load -> edgeq.quantize (LiteRT quantizer) -> int8_constraints.enforce -> verify.check_runs."""
    src = load_tflite(files["fp16"])
    name = src.inputs[0].name
    calib, held = _samples(40, 1, name), _samples(12, 2, name)
    q = quantize(src, QuantizeRequest(Scheme.INT8), lambda: iter(calib))
    q, report = enforce(q)
    assert not report.changed  # the LiteRT quantizer already met every kernel requirement here
    assert violations(q) == []
    ops = read_model(q).ops
    compute = [op for op in ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED",
                                               "MAX_POOL_2D", "CONCATENATION", "MEAN")]
    assert len(compute) == 7 and all(str(op.precision) == "int8" for op in compute)  # 2 CONV_2D
    run = check_runs(q, held, reference=run_model(src.float_tflite, held))
    assert run.delegation.delegated == run.delegation.nodes
    assert run.fidelity.worst("cosine") > 0.99
    # the same network exported as float32 quantizes to nearly the same model (fp16 rounding of the
    # weights moves a few outputs by one or two quanta)
    plain = load_tflite(files["float"])
    q32, _ = enforce(quantize(plain, QuantizeRequest(Scheme.INT8), lambda: iter(_samples(40, 1))))
    out32 = check_runs(q32, _samples(12, 2)).outputs
    a, b = next(iter(out32.values())).ravel(), next(iter(run.outputs.values())).ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def _with_custom(model: bytes, name: str) -> bytes:
    m = te.load(model)
    sg = m.subgraphs[0]
    code = m.operatorCodes[sg.operators[-1].opcodeIndex]
    code.builtinCode = code.deprecatedBuiltinCode = 32  # CUSTOM
    code.customCode = name
    return te.pack(m)


def test_unknown_custom_op_refused_in_one_line(files, tmp_path):
    path = tmp_path / "custom.tflite"
    path.write_bytes(_with_custom(files["float"].read_bytes(), "TransformLandmarks"))
    with pytest.raises(ModelFormatError) as e:
        load_tflite(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "1 custom op(s) (TransformLandmarks) that the LiteRT interpreter cannot load" in msg


def test_already_quantized_refused(files, tf, tmp_path):
    int8 = tmp_path / "int8.tflite"
    src = load_tflite(files["float"])
    int8.write_bytes(quantize(src, QuantizeRequest(Scheme.INT8), lambda: iter(_samples(8, 3))))
    with pytest.raises(ModelFormatError, match=r"already quantized \(\d+ quantized ops: .*CONV_2D.*\); pass the float"):
        load_tflite(int8)


def _while_model(tf) -> bytes:
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(8, 8)).astype(np.float32) * 0.3)

    class Loop(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
        def f(self, x):
            def body(i, h):
                return i + 1, tf.nn.relu(tf.matmul(h, w))
            return {"y": tf.while_loop(lambda i, h: i < 3, body, [tf.constant(0), x])[1]}

    m = Loop()
    c = tf.lite.TFLiteConverter.from_concrete_functions([m.f.get_concrete_function()], m)
    with quiet_native():
        return bytes(c.convert())


def test_control_flow_refused_for_int8_loads_for_dynamic(tf, tmp_path):
    path = tmp_path / "loop.tflite"
    path.write_bytes(_while_model(tf))
    with pytest.raises(ModelFormatError) as e:
        load_tflite(path)
    msg = str(e.value)
    assert "\n" not in msg and "control flow (WHILE)" in msg and "--scheme dynamic" in msg
    src = load_tflite(path, scheme="dynamic")  # dynamic-range needs no calibration inside the loop
    assert [s.name for s in src.inputs] == ["x"]
    q = quantize(src, QuantizeRequest(Scheme.DYNAMIC), None)
    fc = [op for op in read_model(q).ops if op.name == "FULLY_CONNECTED"]
    assert len(fc) == 1 and str(fc[0].precision) == "hybrid"
    held = [{"x": np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)}]
    run = check_runs(q, held, reference=run_model(src.float_tflite, held))
    assert run.fidelity.worst("cosine") > 0.99


def test_signatures_other_than_serving_default(tf, tmp_path):
    """A float .tflite whose one signature is named otherwise is quantized and keeps its name; one
    with a subgraph per signature is refused in one line naming the fix."""
    from edgeq.signature import signature_runner

    m = signed_module(tf, "image")
    tf.saved_model.save(m, str(tmp_path / "one"), signatures={"predict": m.predict})
    tf.saved_model.save(m, str(tmp_path / "two"), signatures={"predict": m.predict, "features": m.features})
    one, two = tmp_path / "one.tflite", tmp_path / "two.tflite"
    with quiet_native():
        one.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "one")).convert())
        two.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "two")).convert())
    src = load_source(one)
    assert src.signature_key == "predict" and read_model(src.float_tflite).signature_keys == ("serving_default",)
    from edgeq.convert import ConvertOptions, convert
    from edgeq.calibration import CalibrationConfig

    np.save(tmp_path / "x.npy", np.random.default_rng(3).uniform(0, 1, (30, 16, 16, 3)).astype(np.float32))
    r = convert(one, ConvertOptions(tmp_path / "q.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy"), 20, 10),
                                    floor=False))
    written = r.output.read_bytes()
    assert read_model(written).signature_keys == ("predict",)
    x = np.random.default_rng(4).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    ref = m.predict(tf.constant(x))["scores"].numpy()
    assert np.corrcoef(signature_runner(written)(image=x)["scores"].ravel(), ref.ravel())[0, 1] > 0.99
    with pytest.raises(ModelFormatError, match=r"2 signatures \(features, predict\), each its own subgraph"):
        load_tflite(two)


@pytest.mark.parametrize("where", ["node inputs", "node outputs", "outputs"])
def test_a_damaged_graph_is_one_line(tf, tmp_path, where):
    """A .tflite damaged in a way the flatbuffer check lets through (a tensor index past the end, as a
    few flipped bytes make): the interpreter's RuntimeError, or a KeyError in a rewrite, was a traceback."""
    from click.testing import CliRunner

    from edgeq.cli import main
    from tests.conftest import build_tiny

    m = te.load(tf.lite.TFLiteConverter.from_keras_model(build_tiny(tf, "conv")).convert())
    sg = m.subgraphs[0]
    bad = len(sg.tensors) + 20
    if where == "node inputs":
        sg.operators[0].inputs = [bad, *list(sg.operators[0].inputs)[1:]]
    elif where == "node outputs":
        sg.operators[0].outputs = [bad]
    else:
        sg.outputs = [bad]
    (tmp_path / "m.tflite").write_bytes(te.pack(m))
    np.save(tmp_path / "x.npy", np.zeros((20, 8, 8, 3), np.float32))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "m.tflite"), "-o", str(tmp_path / "q.tflite"),
                                  "--calib", str(tmp_path / "x.npy"), "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip() == (f"Error: {tmp_path / 'm.tflite'}: the model is inconsistent (RuntimeError: Invalid "
                                f"tensor index {bad} in {where}. The subgraph has {len(sg.tensors)} tensors); the "
                                "file may be damaged: copy or export it again (if it runs elsewhere, report this)"), r.output
    assert not (tmp_path / "q.tflite").exists()
