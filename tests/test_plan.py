"""Precision planning on real ops: tiny Keras models (seeded) converted by the real TFLiteConverter,
read back with edgeq.tflite_model, planned against the shipped device profiles."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edgeq.errors import ProfileError, QuantizationError
from edgeq.plan import Override, default_scheme, integer_only, plan_precision, profile_io, profile_scheme
from edgeq.precision import IoType, Precision, Scheme
from edgeq.profiles import IoTypes, load_profile
from edgeq.tflite_model import read_model, read_ops


def _convert(tf, model_or_fn, *, dynamic=False):
    from edgeq.quiet import quiet_native
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
    with pytest.raises(ProfileError, match=r"override for op 0: unknown precision 'int3'"):
        plan_precision(ops, load_profile("rpi5"), {0: ("int3", "x")})


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


def test_plan_without_a_device(mlp):
    """The accuracy-budget loop without --device: the scheme for every op, overrides on top, all on the CPU."""
    _, flat = mlp
    ops = read_ops(flat)
    plan = plan_precision(ops, None, {0: ("hybrid", "budget step 1"), 2: ("float", "budget step 2")},
                          scheme=Scheme.INT8)
    assert [e.precision for e in plan.entries] == [Precision.HYBRID, Precision.INT8, Precision.FLOAT]
    assert [e.source for e in plan.entries] == ["override", "edgeq", "override"]
    assert {e.placement for e in plan.entries} == {"cpu"} and plan.device is None and not plan.cpu_ops
    assert plan.summary() == "3 ops: 1 int8, 1 hybrid, 1 float"
    d = json.loads(json.dumps(plan.to_json()))
    assert d["device"] is None and d["scheme"] == "int8" and d["accelerator"] is None and not d["uniform"]
    # 256 weights: below the converter's minimum, so hybrid becomes float (as with a profile).
    small = plan_precision(ops, None, {1: ("hybrid", "b")}, scheme=Scheme.DYNAMIC)
    assert [e.precision for e in small.entries] == [Precision.HYBRID, Precision.FLOAT, Precision.HYBRID]
    assert "so float instead of hybrid" in small.entries[1].reason
    with pytest.raises(ValueError, match="needs the scheme"):
        plan_precision(ops, None)


def test_plan_against_the_produced_file(tf, mlp):
    """A dynamic-range file: FC 64x64 hybrid, FC 64x4 (256 weights) and softmax float."""
    model, flat = mlp
    ops = read_ops(flat)
    produced = read_model(_convert(tf, model, dynamic=True))
    all_int8 = plan_precision(ops, load_profile("rpi5"))
    assert all_int8.mismatches(produced) == [
        "#0 FULLY_CONNECTED planned int8, file has hybrid", "#1 FULLY_CONNECTED planned int8, file has float",
        "#2 SOFTMAX planned int8, file has float"]
    assert not any(all_int8.planned_off_int8(op) for op in produced.ops)
    matching = plan_precision(ops, None, {0: ("hybrid", "b"), 1: ("float", "b"), 2: ("float", "b")},
                              scheme=Scheme.INT8, min_weight_elements=0)
    assert matching.mismatches(produced) == []
    assert [op.name for op in produced.float_ops() if matching.planned_off_int8(op)] == [
        "FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX"]


def test_profile_policy():
    """Which scheme and I/O dtype a conversion takes from the profile when the user does not say."""
    rpi4, gpu, coral = load_profile("rpi4"), load_profile("android-gpu"), load_profile("coral-edgetpu")
    assert default_scheme(None, "keras") is Scheme.INT8 and default_scheme(None, "hf") is Scheme.DYNAMIC
    assert default_scheme(rpi4, "hf") is Scheme.INT8 and default_scheme(gpu, "keras") is Scheme.FP16
    assert profile_scheme(replace(rpi4, scheme=Precision.HYBRID)) is Scheme.DYNAMIC
    with pytest.raises(QuantizationError, match="rpi4: scheme float is not a quantization scheme; pass --scheme"):
        profile_scheme(replace(rpi4, scheme=Precision.FLOAT))
    # The profile's int8 I/O only where the scheme makes integer I/O.
    assert profile_io(rpi4, Scheme.INT8) is IoType.INT8
    assert profile_io(rpi4, Scheme.DYNAMIC) is IoType.FLOAT32 and profile_io(rpi4, Scheme.INT16X8) is IoType.FLOAT32
    assert profile_io(replace(rpi4, io=IoTypes(IoType.UINT8, IoType.UINT8)), Scheme.INT8) is IoType.UINT8
    assert profile_io(gpu, Scheme.FP16) is IoType.FLOAT32
    # Every op int8: plain int8 without a device, or an int8-only accelerator with an int8 fallback.
    assert integer_only(None, Scheme.INT8) and integer_only(coral, Scheme.INT8)
    assert not integer_only(rpi4, Scheme.INT8) and not integer_only(None, Scheme.DYNAMIC)
    assert not integer_only(coral, Scheme.INT16X8)


def test_user_scheme_replaces_the_profiles_default_but_not_its_op_table(cnn):
    """`--scheme dynamic --device android-nnapi`: ops the profile's [ops] table names keep its
    precision (EXP: float, NNAPI maps it for float only), the others take the user's scheme (before,
    the profile's scheme won silently)."""
    profile = load_profile("android-nnapi")
    ops = read_ops(cnn)
    plain = {e.op: e for e in plan_precision(ops, profile, min_weight_elements=0).entries}
    mine = plan_precision(ops, profile, scheme=Scheme.DYNAMIC, min_weight_elements=0)
    by = {e.op: e for e in mine.entries}
    assert plain["CONV_2D"].precision is Precision.INT8 and plain["EXP"].precision is Precision.FLOAT
    assert by["CONV_2D"].precision is Precision.HYBRID and "--scheme hybrid" in by["CONV_2D"].reason
    assert by["EXP"].precision is Precision.FLOAT and by["EXP"].reason == plain["EXP"].reason
    assert str(mine.scheme) == "hybrid"


def test_hybrid_plans_weightless_ops_float_without_a_disagreement(tf):
    """A hybrid plan (--scheme dynamic's budget loop makes one) says hybrid for every op; ops without
    weights (a MEAN here; BirdNET's REDUCE_MIN, SUB, ...) have no hybrid kernel and stay float by
    design. BirdNET warned "the produced model disagrees with the plan: #0 REDUCE_MIN planned
    hybrid, file has float" for six of them. A real disagreement still shows, numbered as in the file."""
    import numpy as np

    from edgeq.litert_quant import per_op_from_plan, quantize_per_op
    from edgeq.precision import Precision
    from edgeq.tflite_model import read_model
    from tests.conftest import build_int4_graph

    fm = build_int4_graph(tf)
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(1, 8, 8, 16)).astype(np.float32)} for _ in range(4)]
    plan = plan_precision(list(read_model(fm).ops), None, None, scheme=Precision.HYBRID, min_weight_elements=0)
    assert [str(e.precision) for e in plan.entries if e.op == "MEAN"] == ["hybrid"]
    info = read_model(quantize_per_op(fm, Precision.HYBRID, per_op_from_plan(plan), samples))
    assert [str(op.precision) for op in info.ops if op.name == "MEAN"] == ["float"]
    assert plan.mismatches(info) == []
    floated = read_model(quantize_per_op(fm, Precision.FLOAT, [], samples))
    assert plan.mismatches(floated) == [f"#{op.index} {op.name} planned hybrid, file has float"
                                        for op in floated.ops if op.has_weights]  # MEAN not among them


def test_ops_the_litert_quantizer_writes_float_are_planned_float(tf, tmp_path):
    """MediaPipe's face mesh for rpi4: 23 PRELU planned int8, the LiteRT quantizer wrote them float
    (it has no int8 recipe for PRELU) and convert warned that the file disagrees with the plan. With
    `litert` the plan says float and why, and matches what the quantizer writes; LEAKY_RELU (folded
    into int8 afterwards) and TRANSPOSE_CONV (the quantizer's CONV_2D_TRANSPOSE) stay int8."""
    import numpy as np

    from edgeq.litert_quant import per_op_from_plan, quantize_per_op
    from edgeq.signature import signature_runner
    from edgeq.sources import load_source

    tf.keras.utils.set_random_seed(3)
    L = tf.keras.layers
    inp = tf.keras.Input((8, 8, 3))
    x = L.PReLU(shared_axes=[1, 2])(L.Conv2D(4, 3, padding="same")(inp))
    x = L.LeakyReLU(0.2)(L.Conv2D(4, 3, padding="same")(x))
    x = L.Conv2DTranspose(2, 3, strides=2, padding="same")(x)
    tf.keras.Model(inp, x).save(tmp_path / "m.keras")
    flat = load_source(str(tmp_path / "m.keras")).float_tflite
    ops = read_ops(flat)
    assert {"PRELU", "LEAKY_RELU", "TRANSPOSE_CONV"} <= {op.name for op in ops}
    rpi4 = load_profile("rpi4")
    plan = plan_precision(ops, rpi4, scheme=Scheme.INT8, min_weight_elements=0, litert=True)
    by_op = {e.op: e for e in plan.entries}
    assert by_op["PRELU"].precision is Precision.FLOAT
    assert "the LiteRT quantizer has no int8 recipe for PRELU, so float" in by_op["PRELU"].reason
    assert by_op["LEAKY_RELU"].precision is Precision.INT8 and by_op["TRANSPOSE_CONV"].precision is Precision.INT8
    key = next(iter(signature_runner(flat).get_input_details()))
    samples = [{key: s} for s in np.random.default_rng(0).normal(size=(16, 1, 8, 8, 3)).astype(np.float32)]
    written = read_model(quantize_per_op(flat, Precision.INT8, per_op_from_plan(plan), samples))
    assert [op.precision for op in written.ops if op.name == "PRELU"] == [Precision.FLOAT]
    assert plan.mismatches(written) == []
    old = plan_precision(ops, rpi4, scheme=Scheme.INT8, min_weight_elements=0)  # what convert planned before
    assert [m for m in old.mismatches(written) if "PRELU" in m] and not plan.mismatches(written)
