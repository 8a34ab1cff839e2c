"""Precision planning on real ops: tiny Keras models (seeded) converted by the real TFLiteConverter,
read back with edgeq.tflite_model, planned against the shipped device profiles."""

from __future__ import annotations

import json

import pytest

from edgeq.errors import ProfileError
from edgeq.plan import Override, plan_precision
from edgeq.profiles import Precision, load_profile
from edgeq.tflite_model import read_ops


def _convert(tf, model_or_fn, *, dynamic=False):
    from edgeq.tfimport import quiet_native
    with quiet_native():
        if callable(model_or_fn) and not isinstance(model_or_fn, tf.keras.Model):
            c = tf.lite.TFLiteConverter.from_concrete_functions([model_or_fn.get_concrete_function()])
        else:
            c = tf.lite.TFLiteConverter.from_keras_model(model_or_fn)
        if dynamic:
            c.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights, float activations
        return c.convert()


@pytest.fixture(scope="module")
def mlp(tf):
    """Dense 64->64 (4096 weights) -> Dense 64->4 (256 weights) -> softmax."""
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((64,))
    x = tf.keras.layers.Dense(64, activation="relu")(inp)
    out = tf.keras.layers.Softmax()(tf.keras.layers.Dense(4)(x))
    m = tf.keras.Model(inp, out)
    return m, _convert(tf, m)


@pytest.fixture(scope="module")
def cnn(tf):
    """conv -> exp -> depthwise -> global mean -> dense -> argmax: EXP is off the Edge TPU's list,
    ARG_MAX off the GPU delegate's."""
    tf.keras.utils.set_random_seed(1)
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = tf.keras.layers.Lambda(tf.exp)(x)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(3)(x)
    out = tf.keras.layers.Lambda(lambda t: tf.argmax(t, axis=-1))(x)
    return _convert(tf, tf.keras.Model(inp, out))


def names(plan):
    return [e.op for e in plan.entries]


def test_cpu_target_plans_everything_int8(mlp):
    _, flat = mlp
    ops = read_ops(flat)
    assert [o.name for o in ops] == ["FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX"]
    plan = plan_precision(ops, load_profile("rpi4"))
    assert [e.precision for e in plan.entries] == [Precision.INT8] * 3
    assert plan.is_uniform and plan.cpu_ops == [] and plan.accelerator is None
    assert plan.summary() == "3 ops: 3 int8"
    assert plan.entries[0].output == ops[0].outputs[0].name


def _with_policy(tmp_path, base_id, ops_toml):
    text = load_profile(base_id).path.read_text()
    text = text.replace(f'id = "{base_id}"', 'id = "policy-board"') + "\n[ops]\n" + ops_toml
    (tmp_path / "policy-board.toml").write_text(text)
    return load_profile("policy-board", devices_dir=tmp_path)


def test_hybrid_policy_needs_a_big_enough_constant_weight(tmp_path, tf, mlp):
    model, flat = mlp
    profile = _with_policy(tmp_path, "rpi5",
                           'FULLY_CONNECTED = { precision = "hybrid", reason = "keep activations float", '
                           'source = "test" }\n'
                           'SOFTMAX = { precision = "hybrid", reason = "softmax stays precise", source = "test" }\n')
    plan = plan_precision(read_ops(flat), profile)
    fc_big, fc_small, softmax = plan.entries
    assert fc_big.precision is Precision.HYBRID and fc_big.reason == "keep activations float"
    assert fc_big.source == "test"
    assert fc_small.precision is Precision.FLOAT
    assert "weight has 256 elements (< 1024" in fc_small.reason
    assert softmax.precision is Precision.FLOAT
    assert "no constant weight to store as int8, so float instead of hybrid" in softmax.reason
    assert not plan.is_uniform and plan.counts() == {"hybrid": 1, "float": 2}

    # The real converter agrees op for op: dynamic range quantizes exactly the planned weight.
    produced = [o.precision for o in read_ops(_convert(tf, model, dynamic=True))]
    assert produced == ["hybrid", "float", "float"]

    # A quantizer without the size threshold (min_weight_elements=0) gets the small weight hybrid too.
    plan0 = plan_precision(read_ops(flat), profile, min_weight_elements=0)
    assert [e.precision for e in plan0.entries] == [Precision.HYBRID, Precision.HYBRID, Precision.FLOAT]


def test_float_policy_on_nnapi_keeps_the_op_on_the_accelerator(cnn):
    plan = plan_precision(read_ops(cnn), load_profile("android-nnapi"))
    by_op = {e.op: e for e in plan.entries}
    assert names(plan) == ["CONV_2D", "EXP", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "ARG_MAX"]
    exp = by_op["EXP"]
    assert exp.precision is Precision.FLOAT and exp.placement == "accelerator"
    assert "nnapi_delegate.cc" in exp.source and "float" in exp.reason
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "ARG_MAX"):
        assert by_op[op].precision is Precision.INT8 and by_op[op].placement == "accelerator", op


def test_edgetpu_fallback_stays_int8_and_splits_the_graph(cnn):
    plan = plan_precision(read_ops(cnn), load_profile("coral-edgetpu"))
    got = [(e.op, e.precision, e.placement) for e in plan.entries]
    assert got == [("CONV_2D", "int8", "accelerator"),
                   ("EXP", "int8", "cpu"),  # not on the Edge TPU's list
                   # single segment: everything after the first CPU op stays on the CPU
                   ("DEPTHWISE_CONV_2D", "int8", "cpu"), ("MEAN", "int8", "cpu"),
                   ("FULLY_CONNECTED", "int8", "cpu"), ("ARG_MAX", "int8", "cpu")]
    assert plan.entries[1].reason == "Edge TPU does not support EXP: runs int8 on the CPU (the graph splits here)"
    assert "maps only the ops before the first one it cannot take" in plan.entries[2].reason
    assert plan.is_uniform  # still a plain full-integer conversion
    assert plan.summary() == "6 ops: 6 int8; 5 on the CPU instead of the Edge TPU (graph splits)"


def test_gpu_plans_fp16_and_unsupported_ops_fall_back_to_float(cnn):
    plan = plan_precision(read_ops(cnn), load_profile("android-gpu"))
    last = plan.entries[-1]
    assert last.op == "ARG_MAX" and last.precision is Precision.FLOAT and last.placement == "cpu"
    assert last.reason.startswith("GPU delegate does not support ARG_MAX: runs float on the CPU")
    assert [e.precision for e in plan.entries[:-1]] == [Precision.FP16] * 5
    assert all(e.placement == "accelerator" for e in plan.entries[:-1])
    assert not plan.is_uniform


def test_override_the_target_cannot_run_is_refused_with_its_cost(mlp):
    _, flat = mlp
    ops = read_ops(flat)
    coral = load_profile("coral-edgetpu")
    with pytest.raises(ProfileError) as e:
        plan_precision(ops, coral, {1: Override(Precision.FLOAT, "accuracy budget")})
    msg = str(e.value)
    assert msg.startswith("coral-edgetpu: op 1 (FULLY_CONNECTED) cannot run float on the Edge TPU (it runs int8)")
    assert "move it to the CPU and split the graph" in msg and "\n" not in msg
    with pytest.raises(ProfileError, match="cannot run hybrid on the Edge TPU"):
        plan_precision(ops, coral, {0: ("hybrid", "budget")})

    # Accepting the cost moves the op (and, single-segment, the rest) to the CPU.
    plan = plan_precision(ops, coral, {1: Override(Precision.FLOAT, "accuracy budget")}, allow_cpu_fallback=True)
    assert [(e.precision, e.placement) for e in plan.entries] == [
        ("int8", "accelerator"), ("float", "cpu"), ("int8", "cpu")]
    assert plan.entries[1].source == "override" and plan.entries[1].reason.startswith("accuracy budget")


def test_overrides_on_a_cpu_target(mlp):
    _, flat = mlp
    ops = read_ops(flat)
    plan = plan_precision(ops, load_profile("rpi5"),
                          {2: ("float", "softmax error 0.03 > budget"), (0, 0): ("hybrid", "budget")})
    assert [e.precision for e in plan.entries] == [Precision.HYBRID, Precision.INT8, Precision.FLOAT]
    assert plan.entries[2].reason == "softmax error 0.03 > budget" and plan.entries[2].source == "override"
    with pytest.raises(ProfileError, match=r"override for op 7: no such op in the model"):
        plan_precision(ops, load_profile("rpi5"), {7: ("float", "x")})
    with pytest.raises(ProfileError, match=r"override for op 0: unknown precision 'int4'"):
        plan_precision(ops, load_profile("rpi5"), {0: ("int4", "x")})


def test_ops_without_float_tensors_are_other(tf):
    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32), tf.TensorSpec([4], tf.int32)])
    def fn(x, idx):
        return tf.gather(x, idx, axis=1), idx * 3

    ops = read_ops(_convert(tf, fn))
    plan = plan_precision(ops, load_profile("rpi4"))
    got = {e.op: e.precision for e in plan.entries}
    assert got == {"GATHER": Precision.INT8, "MUL": Precision.OTHER}
    assert plan.is_uniform


def test_plan_json(mlp):
    _, flat = mlp
    plan = plan_precision(read_ops(flat), load_profile("android-nnapi"))
    d = json.loads(json.dumps(plan.to_json()))
    assert d["device"] == "android-nnapi" and d["scheme"] == "int8" and d["accelerator"] == "NNAPI"
    assert sum(d["counts"].values()) == len(d["ops"]) == 3
    assert d["ops"][0] == {"index": 0, "subgraph": 0, "op": "FULLY_CONNECTED",
                           "output": plan.entries[0].output, "precision": "int8", "placement": "accelerator",
                           "reason": "default scheme of android-nnapi",
                           "source": str(load_profile("android-nnapi").path)}
