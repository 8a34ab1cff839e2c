"""io_rounding: what integer model inputs/outputs lose by themselves, and convert's refusal before the
budget loop where that alone misses the target. Real converter, quantizer and LiteRT interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import save_keras
from edgeq.calibration import CalibrationConfig
from edgeq.convert import BudgetOptions, ConvertOptions, convert
from edgeq.errors import QuantizationError
from edgeq.precision import IoType


@pytest.fixture(scope="module")
def mixed_scales(tf, tmp_path_factory):
    """Unnormalized tabular inputs: one feature in the hundreds the model barely weighs, fifteen in the
    hundredths it reads. One int8 scale for the whole input rounds the fifteen to zero."""
    d = tmp_path_factory.mktemp("io")
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    m = tf.keras.Sequential([tf.keras.Input((16,)), L.Dense(32, activation="relu"), L.Dense(8)])
    k, b = m.layers[0].get_weights()
    k[0] *= 1e-4
    k[1:] *= 30.0
    m.layers[0].set_weights([k, b])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 16)).astype(np.float32) * 0.01
    x[:, 0] = rng.uniform(100, 400, 120)
    np.save(d / "x.npy", x)
    np.save(d / "n.npy", rng.standard_normal((120, 16)).astype(np.float32) * 0.01)  # the fifteen's scale only
    return save_keras(tf, m, d / "m.keras"), d


def _samples_and_reference(model, data):
    from edgeq.calibration import load_calibration
    from edgeq.fidelity import run_model
    from edgeq.sources import load_source

    src = load_source(model)
    cal = load_calibration(CalibrationConfig(str(data), samples=80, eval_samples=40), src.inputs, src.make_text_samples)
    samples = list(cal.evaluation())
    return src, samples, run_model(src.float_tflite, samples)


def test_int8_io_that_alone_misses_the_budget_is_refused_before_the_loop(mixed_scales, tmp_path):
    model, d = mixed_scales
    cal = CalibrationConfig(str(d / "x.npy"), samples=80, eval_samples=40)
    out = tmp_path / "o.tflite"
    with pytest.raises(QuantizationError) as e:
        convert(model, ConvertOptions(out, calib=cal, io=IoType.INT8, budget=BudgetOptions(0.02, "cosine")))
    msg = str(e.value)
    assert "\n" not in msg and "rounding the int8 input and output alone loses it" in msg, msg
    assert "pass --io float32" in msg and "needs >= 0.98" in msg
    cos = float(msg.split("cosine ")[1].split(" ")[0])
    assert cos < 0.9, msg
    assert not out.exists() and not list(tmp_path.iterdir())


def test_io_rounding_is_the_float_model_on_rounded_inputs(mixed_scales, tmp_path):
    """The measure itself: the float model fed inputs rounded to the written file's input scale and
    zero point, its outputs rounded to the output's; None for float I/O; near 1 where one scale suits."""
    from edgeq.fidelity import compare
    from edgeq.io_rounding import io_rounding
    from edgeq.signature import signature_runner

    model, d = mixed_scales
    src, samples, ref = _samples_and_reference(model, d / "x.npy")
    cal = CalibrationConfig(str(d / "x.npy"), samples=80, eval_samples=40)
    convert(model, ConvertOptions(tmp_path / "i.tflite", calib=cal, io=IoType.INT8, floor=False))
    convert(model, ConvertOptions(tmp_path / "f.tflite", calib=cal, io=IoType.FLOAT32, floor=False))
    q = (tmp_path / "i.tflite").read_bytes()
    io = io_rounding(src.float_tflite, q, samples, ref)
    assert io.inputs and io.outputs and io.dtypes == ("int8",)
    # by hand: the input's own scale and zero point, from the file
    runner = signature_runner(q)
    (name, din), = runner.get_input_details().items()
    (oname, dout), = runner.get_output_details().items()
    s, z = din["quantization"]
    rounded = [{name: ((np.clip(np.round(x[name] / s + z), -128, 127) - z) * s).astype(np.float32)} for x in samples]
    from edgeq.fidelity import run_model
    y = run_model(src.float_tflite, rounded)[oname]
    so, zo = dout["quantization"]
    y = (np.clip(np.round(y / so + zo), -128, 127) - zo) * so
    by_hand = compare(ref, {oname: y}).outputs[0].cosine
    assert io.fidelity.outputs[0].cosine == pytest.approx(by_hand, abs=1e-6)
    assert by_hand < 0.9
    assert io_rounding(src.float_tflite, (tmp_path / "f.tflite").read_bytes(), samples, ref) is None
    # inputs of one scale: the same rounding costs almost nothing, and convert goes on to its loop
    src2, samples2, ref2 = _samples_and_reference(model, d / "n.npy")
    convert(model, ConvertOptions(tmp_path / "n.tflite", calib=CalibrationConfig(str(d / "n.npy"), samples=80,
                                                                               eval_samples=40), io=IoType.INT8,
                                  floor=False))
    ok = io_rounding(src2.float_tflite, (tmp_path / "n.tflite").read_bytes(), samples2, ref2)
    assert ok.fidelity.outputs[0].cosine > 0.995
