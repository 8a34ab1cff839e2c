"""A written model has run: the real LiteRT interpreter with the target's options (XNNPACK,
threads), delegation read back, interpreter errors turned into one line naming the op."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from edgeq.errors import QuantizationError
from edgeq.profiles import load_profile
from edgeq.quiet import quiet_native
from edgeq.fidelity import run_model
from edgeq.verify import RuntimeOptions, check_runs, runtime_options


def _samples(n, seed, shape=(1, 8, 8, 3)):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(n)]


def _int8(tf, keras, calib) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(keras)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([s["image"]] for s in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    with quiet_native():
        return bytes(conv.convert())


def _float(tf, keras) -> bytes:
    with quiet_native():
        return bytes(tf.lite.TFLiteConverter.from_keras_model(keras).convert())


@pytest.fixture(scope="module")
def models(tf):
    tf.keras.utils.set_random_seed(11)
    L = tf.keras.layers
    x = tf.keras.Input((8, 8, 3), batch_size=1, name="image")
    h = L.MaxPool2D()(L.Conv2D(8, 3, padding="same", activation="relu")(x))
    cnn = tf.keras.Model(x, L.Dense(4)(L.Reshape((128,))(h)))
    p = L.PReLU(shared_axes=[1, 2])(L.Conv2D(8, 3, padding="same")(x))
    prelu = tf.keras.Model(x, L.Conv2D(4, 1)(p))
    calib = _samples(24, 1)
    return {"cnn_float": _float(tf, cnn), "cnn": _int8(tf, cnn, calib),
            "prelu": _int8(tf, prelu, calib), "prelu_float": _float(tf, prelu)}


def test_profile_options_from_real_profiles():
    assert runtime_options() == RuntimeOptions(threads=2, xnnpack=True, target="this host")
    rpi4 = runtime_options(load_profile("rpi4"))
    assert (rpi4.threads, rpi4.xnnpack, rpi4.target) == (4, True, "rpi4")
    gpu = runtime_options(load_profile("android-gpu"))  # the CPU fallback path is what runs here
    assert gpu.xnnpack and gpu.threads == 4
    assert "XNNPACK, 4 threads" in rpi4.label
    # the host's interpreter stands in for the Pi's tflite-runtime: the label says so
    assert rpi4.label.endswith("; run by ai-edge-litert 2.3.0 here, not its tflite-runtime 2.14.0)"), rpi4.label
    assert "run by" not in runtime_options(load_profile("rpi5")).label  # its runtime is the one here
    # an accelerator profile's check runs every op on the host's CPU: not a run on the accelerator
    assert "every op on this host's CPU, not the Edge TPU; run by" in runtime_options(load_profile("coral-edgetpu")).label
    assert "every op on this host's CPU, not the NNAPI" in runtime_options(load_profile("android-nnapi")).label


def test_runs_fully_delegated_with_fidelity(models):
    held = _samples(10, 2)
    r = check_runs(models["cnn"], held, reference=run_model(models["cnn_float"], held))
    d = r.delegation
    assert d.nodes == d.delegated == 6 and d.partitions == 1 and d.builtin_ops == ()  # Q, CONV, POOL, RESHAPE, FC, DQ
    assert r.samples == 10 and r.fidelity.worst("cosine") > 0.99
    assert r.outputs["output_0"].shape == (10, 4) and r.warnings() == []
    assert r.to_json()["delegation"]["partitions"] == 1


def test_int8_op_left_to_builtin_kernels_is_reported(models):
    """XNNPACK has no int8 PRELU: the node runs on the builtin kernel and cuts the delegated graph."""
    held = _samples(4, 3)
    r = check_runs(models["prelu"], held, reference=run_model(models["prelu_float"], held))
    d = r.delegation
    assert d.builtin_ops == ("PRELU",) and d.delegated == d.nodes - 1 and d.partitions == 2
    assert d.builtin_int8_compute == ("PRELU",)
    (w,) = r.warnings()
    assert "builtin kernels ran PRELU" in w and "XNNPACK took" in w


def test_builtin_kernels_only(models):
    held = _samples(4, 4)
    ref = check_runs(models["cnn"], held)
    r = check_runs(models["cnn"], held, RuntimeOptions(threads=1, xnnpack=False))
    assert r.delegation is None
    # XNNPACK and the builtin int8 kernels round differently by at most one output quantum
    from edgeq.tflite_model import read_model
    (dq,) = [op for op in read_model(models["cnn"]).ops if op.name == "DEQUANTIZE"]
    quantum = dq.inputs[0].scale[0]
    diff = np.abs(r.outputs["output_0"] - ref.outputs["output_0"])
    assert diff.max() <= quantum * 1.01 and np.isin(np.round(diff / quantum), [0, 1]).all()


def _edit(model: bytes, fn) -> bytes:
    m = te.load(model)
    fn(m, m.subgraphs[0])
    return te.pack(m)


def test_prepare_failure_names_op_and_reason(models):
    def asymmetric_filter(m, sg):
        conv = next(op for op in sg.operators if te.op_name(m, op) == "CONV_2D")
        q = sg.tensors[int(conv.inputs[1])].quantization
        q.zeroPoint = [2] * len(q.scale)

    bad = _edit(models["cnn"], asymmetric_filter)
    with pytest.raises(QuantizationError) as e:
        check_runs(bad, _samples(1, 5))
    msg = str(e.value)
    assert "\n" not in msg
    assert "op #1 CONV_2D failed: conv.cc affine_quantization->zero_point->data[i] != 0 (2 != 0)" in msg
    assert "--scheme dynamic" in msg and "--device" in msg


def test_missing_kernels_named(models):
    def unknown_custom(m, sg):
        code = m.operatorCodes[sg.operators[2].opcodeIndex]  # the MAX_POOL_2D
        code.builtinCode = code.deprecatedBuiltinCode = 32  # CUSTOM
        code.customCode = "EdgeqMissing"

    with pytest.raises(QuantizationError, match=r"op #2 EdgeqMissing failed.*unresolved custom op"):
        check_runs(_edit(models["cnn"], unknown_custom), _samples(1, 6))

    def future_version(m, sg):
        m.operatorCodes[sg.operators[1].opcodeIndex].version = 99

    with pytest.raises(QuantizationError, match=r"no kernel for CONV_2D v99"):
        check_runs(_edit(models["cnn"], future_version), _samples(1, 6))
