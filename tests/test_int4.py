"""int4 weights end to end on real parts: a tiny seeded graph converted by the real TFLiteConverter,
planned (plan.py), quantized by the real LiteRT quantizer (litert_quant), read back from the file
(op dtypes, block sizes) and run by the real LiteRT interpreter, with and without XNNPACK.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pytest

from edgeq.litert_quant import per_op_from_plan, quantize_per_op
from edgeq.plan import Override, plan_precision
from edgeq.precision import INT4_BLOCK_SIZE, Precision
from edgeq.profiles import OpPolicy, load_profile
from edgeq.tflite_model import read_model

P = Precision


def _graph(tf, seed: int = 0):
    """CONV_2D 3x3 16->32, DEPTHWISE_CONV_2D, spatial mean, FC 32->256 (last dim 32: only
    blockwise-32 divides it), FC 256->128 (every block size divides 256), as a float .tflite."""
    from edgeq.signature import ensure_signature
    from edgeq.tfimport import quiet_native

    rng = np.random.default_rng(seed)
    k = tf.constant(rng.normal(0, 0.1, (3, 3, 16, 32)).astype(np.float32))
    d = tf.constant(rng.normal(0, 0.3, (3, 3, 32, 1)).astype(np.float32))
    w1 = tf.constant(rng.normal(0, 0.2, (32, 256)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.1, (256, 128)).astype(np.float32))

    @tf.function
    def fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))
        h = tf.nn.depthwise_conv2d(h, d, [1, 1, 1, 1], "SAME")
        h = tf.nn.relu(tf.matmul(tf.reduce_mean(h, axis=[1, 2]), w1))
        return tf.matmul(h, w2)

    with quiet_native():
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, 8, 8, 16], tf.float32))], fn)
        return ensure_signature(bytes(conv.convert()))[0]


@pytest.fixture(scope="module")
def float_model(tf):
    return _graph(tf)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(1, 8, 8, 16)).astype(np.float32)} for _ in range(8)]


def _run(model: bytes, samples, xnnpack: bool = True) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    runner = Interpreter(model_content=model, num_threads=1, **kw).get_signature_runner()
    return np.concatenate([next(iter(runner(**s).values())).ravel() for s in samples]).astype(np.float64)


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _by_op(info):
    return {op.name: [o for o in info.ops if o.name == op.name] for op in info.ops}


def _quantize(float_model, precision, samples, profile=None, overrides=None):
    ops = list(read_model(float_model).ops)
    if profile is None:
        plan = plan_precision(ops, None, overrides, scheme=precision, min_weight_elements=0)
    else:
        plan = plan_precision(ops, profile, overrides, min_weight_elements=0)
    default = plan.scheme if plan.scheme is not P.FP16 else P.FLOAT
    q = quantize_per_op(float_model, default, per_op_from_plan(plan), samples)
    return plan, q, read_model(q)


@pytest.mark.parametrize("precision,conv,fc1,fc2", [
    # dynamic int4: CONV_2D and both FCs int4 per channel; DEPTHWISE has no int4 recipe -> hybrid
    (P.INT4, P.INT4, P.INT4, P.INT4),
    # blockwise: no blockwise CONV_2D (hybrid); FC 32->256 has last dim 32, which 32 divides
    (P.INT4_B32, P.HYBRID, P.INT4_B32, P.INT4_B32),
    # block 128 does not divide FC1's last dim (32): hybrid there, with the reason
    (P.INT4_B128, P.HYBRID, P.HYBRID, P.INT4_B128),
    # static: int4 weights, int8 activations; DEPTHWISE falls back to int8
    (P.INT4X8, P.INT4X8, P.INT4X8, P.INT4X8),
])
def test_int4_plan_reads_back_from_the_file(float_model, samples, precision, conv, fc1, fc2):
    plan, q, info = _quantize(float_model, precision, samples)
    planned = {e.op + str(i): e.precision for i, e in enumerate(plan.entries)}
    got = [(op.name, op.precision, op.weight_block_size) for op in info.ops
           if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    dw = P.INT8 if precision is P.INT4X8 else P.HYBRID
    assert got == [("CONV_2D", conv, INT4_BLOCK_SIZE.get(conv, 0)), ("DEPTHWISE_CONV_2D", dw, 0),
                   ("FULLY_CONNECTED", fc1, INT4_BLOCK_SIZE.get(fc1, 0)),
                   ("FULLY_CONNECTED", fc2, INT4_BLOCK_SIZE.get(fc2, 0))], planned
    assert plan.mismatches(info) == []
    # Dynamic int4 ops compute on float activations: convert's "stayed float" check must see them as planned.
    dynamic = [op for op in info.ops if op.precision in (P.INT4, P.INT4_B32, P.INT4_B128)]
    assert all(op in info.float_ops() and plan.planned_off_int8(op) for op in dynamic)
    assert (precision is P.INT4X8) == (not dynamic)
    # The int4 weights really are int4 tensors in the file, the others int8.
    for op in info.ops:
        if op.precision in INT4_BLOCK_SIZE:
            assert op.int4_weight is not None and op.int4_weight.dtype == "int4"
            assert op.int4_weight.block_size == INT4_BLOCK_SIZE[op.precision]
    if precision is P.INT4_B128:
        fc1_entry = [e for e in plan.entries if e.op == "FULLY_CONNECTED"][0]
        assert "last dimension 32 is not a multiple of the block size 128, so hybrid" in fc1_entry.reason
    # Real kernels: the int4 model stays close to float and is much smaller than int8 weights. Without
    # XNNPACK the builtin blockwise FC drops FC1's fused RELU (the runtime table's xnnpack_only).
    ref = _run(float_model, samples)
    assert _cos(_run(q, samples), ref) > 0.98
    builtin = _cos(_run(q, samples, xnnpack=False), ref)
    assert builtin < 0.9 if fc1 in load_profile("host-x86_64").int4_ops["FULLY_CONNECTED"].xnnpack_only \
        else builtin > 0.98
    hybrid = quantize_per_op(float_model, P.HYBRID, (), None)
    if precision is P.INT4:
        assert len(q) < 0.62 * len(hybrid), (len(q), len(hybrid))


def test_weight_only_int4_reads_back_and_warns(float_model, samples):
    plan, q, info = _quantize(float_model, P.INT4_WEIGHT_ONLY, samples)
    fcs = [op for op in info.ops if op.name == "FULLY_CONNECTED"]
    assert [op.precision for op in fcs] == [P.INT4_WEIGHT_ONLY] * 2 and plan.mismatches(info) == []
    deq = [op for op in info.ops if op.name == "DEQUANTIZE"]
    assert len(deq) == 3 and all(op.inputs[0].dtype == "int4" for op in deq)  # CONV_2D + 2 FC weights
    assert plan.warnings() == [f"3 op(s) planned int4-weight-only on the CPU: {plan.entries[0].reason.split('WARNING: ')[1]}"]
    assert "slower than float on a CPU" in plan.warnings()[0]
    assert _cos(_run(q, samples), _run(float_model, samples)) > 0.98


def test_profile_policy_plans_int4_where_the_runtime_runs_it(float_model, samples):
    """[ops] CONV_2D/FULLY_CONNECTED = int4: LiteRT 2.3 runs both; tflite-runtime 2.14 (rpi4) computes NaN
    for dynamic int4 CONV_2D (measured), so there the plan falls back to hybrid and says why."""
    int4 = {op: OpPolicy(op, P.INT4, "smaller download", "test") for op in ("CONV_2D", "FULLY_CONNECTED")}
    host = replace(load_profile("host-x86_64"), ops=MappingProxyType(int4), scheme=P.HYBRID)
    rpi4 = replace(load_profile("rpi4"), ops=MappingProxyType(int4), scheme=P.HYBRID)
    on_host = {e.op: e for e in plan_precision(list(read_model(float_model).ops), host, min_weight_elements=0).entries}
    on_pi = {e.op: e for e in plan_precision(list(read_model(float_model).ops), rpi4, min_weight_elements=0).entries}
    assert on_host["CONV_2D"].precision is P.INT4 and on_host["FULLY_CONNECTED"].precision is P.INT4
    assert on_pi["FULLY_CONNECTED"].precision is P.INT4
    assert on_pi["CONV_2D"].precision is P.HYBRID
    assert "tflite-runtime 2.14.0 has no int4 kernel for CONV_2D" in on_pi["CONV_2D"].reason
    assert "outputs NaN" in on_pi["CONV_2D"].reason
    # The accuracy-budget loop's move: one layer from int4 to int8 weights by override.
    ops = list(read_model(float_model).ops)
    last_fc = [op for op in ops if op.name == "FULLY_CONNECTED"][-1]
    plan, q, info = _quantize(float_model, P.INT4, samples,
                              overrides={last_fc.index: Override(P.HYBRID, "budget: most damaging layer")})
    assert [op.precision for op in info.ops if op.name == "FULLY_CONNECTED"] == [P.INT4, P.HYBRID]
    assert plan.mismatches(info) == []


@pytest.mark.parametrize("precision", sorted(load_profile("host-x86_64").int4_ops["FULLY_CONNECTED"].runs))
def test_litert_runtime_table_fully_connected_row_is_true(tf, precision):
    """Re-measures the ai-edge-litert 2.3.0 [int4] FULLY_CONNECTED row: every precision it lists runs
    on the real interpreter, with XNNPACK and without, close to float."""
    from edgeq.signature import ensure_signature
    from edgeq.tfimport import quiet_native

    rng = np.random.default_rng(3)
    w = tf.constant(rng.normal(size=(512, 128)).astype(np.float32))
    fn = tf.function(lambda x: tf.matmul(x, w))
    with quiet_native():
        fm = ensure_signature(bytes(tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([2, 512], tf.float32))], fn).convert()))[0]
    xs = [{"x": rng.normal(size=(2, 512)).astype(np.float32)} for _ in range(4)]
    q = quantize_per_op(fm, precision, (), xs)
    (fc,) = [op for op in read_model(q).ops if op.name == "FULLY_CONNECTED"]
    assert fc.precision is precision and fc.weight_block_size == INT4_BLOCK_SIZE[precision]
    ref = _run(fm, xs)
    for xnnpack in (True, False):
        assert _cos(_run(q, xs, xnnpack), ref) > 0.99


def test_size_goal_picks_the_most_accurate_plan_that_fits(float_model, samples):
    """--max-size as a library call: candidates most-accurate first, real quantizer, real interpreter."""
    from edgeq.errors import QuantizationError
    from edgeq.size_goal import choose_for_size, parse_size

    assert parse_size("12MB") == 12_000_000 and parse_size("1.5 MiB") == 1_572_864 and parse_size("900kb") == 900_000
    with pytest.raises(QuantizationError, match=r"--max-size '12 parsecs': expected a size such as 12MB"):
        parse_size("12 parsecs")
    ref = _run(float_model, samples)

    def measure(precision):
        q = quantize_per_op(float_model, precision, (), None)
        return q, _cos(_run(q, samples), ref)

    candidates = [("float", P.FLOAT), ("int8 weights", P.HYBRID), ("int4-b32", P.INT4_B32), ("int4", P.INT4)]
    sizes = {label: len(measure(p)[0]) for label, p in candidates}
    assert sizes["float"] > sizes["int8 weights"] > sizes["int4-b32"] > sizes["int4"]
    got = choose_for_size(candidates, sizes["int8 weights"] - 1, measure)
    assert got.chosen.label == "int4-b32" and [m.label for m in got.tried] == ["float", "int8 weights", "int4-b32"]
    assert got.chosen.fidelity > 0.98 and got.report()[-1].endswith("<- chosen")
    with pytest.raises(QuantizationError, match=r"cannot be reached: the smallest plan tried \(int4\) is "):
        choose_for_size(candidates, 1000, measure)
    with pytest.raises(QuantizationError, match=r"the plans that fit lose too much"):
        choose_for_size(candidates, sizes["int8 weights"] - 1, measure, min_fidelity=0.99999)
