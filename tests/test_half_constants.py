"""Large non-weight float32 constants of int4 models at float16 (half_constants.py), on real parts:
a seeded graph converted by the real TFLiteConverter, quantized by the real LiteRT quantizer through
litert_quant (where int4 plans get it), read back from the file and run by the real LiteRT
interpreter with and without XNNPACK."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from edgeq.half_constants import halve_float_constants
from edgeq.litert_quant import per_op_from_plan, quantize_per_op
from edgeq.plan import Override, plan_precision
from edgeq.precision import Precision
from edgeq.tflite_model import read_model

P = Precision
SEQ, WIDTH = 64, 32  # the position table: 64x32 = 2048 values (>= 1024: halved)


@pytest.fixture(scope="module")
def float_model(tf):
    """x [1, SEQ, WIDTH] + a position table (2048 values, large) * a 32-value scale (small), then
    FC 32->256 and FC 256->64 (their weights are FC operands)."""
    from edgeq.quiet import quiet_native
    from edgeq.signature import ensure_signature

    rng = np.random.default_rng(7)
    pos = tf.constant(rng.normal(0, 1.0, (1, SEQ, WIDTH)).astype(np.float32))
    gain = tf.constant(rng.uniform(0.5, 1.5, (WIDTH,)).astype(np.float32))
    w1 = tf.constant(rng.normal(0, 0.2, (WIDTH, 256)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.1, (256, 64)).astype(np.float32))

    @tf.function
    def fn(x):
        h = tf.nn.relu((x + pos) * gain)  # a ReLU between: the converter cannot fold gain into w1
        return tf.matmul(tf.nn.relu(tf.matmul(h, w1)), w2)

    with quiet_native():
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, SEQ, WIDTH], tf.float32))], fn)
        return ensure_signature(bytes(conv.convert()))[0]


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(3)
    return [{"x": rng.normal(size=(1, SEQ, WIDTH)).astype(np.float32)} for _ in range(6)]


def _run(model: bytes, samples, xnnpack: bool = True) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    runner = Interpreter(model_content=model, num_threads=1, **kw).get_signature_runner()
    return np.concatenate([next(iter(runner(**s).values())).ravel() for s in samples]).astype(np.float64)


def _quantize(float_model, samples, scheme: Precision, overrides=None) -> bytes:
    plan = plan_precision(list(read_model(float_model).ops), None, overrides, scheme=scheme, min_weight_elements=0)
    return quantize_per_op(float_model, plan.scheme, per_op_from_plan(plan), samples)


def _constants(model: bytes) -> dict[tuple[int, ...], tuple[str, list[str]]]:
    """shape -> (dtype, names of the ops that read it) of each constant tensor with 32+ values."""
    m = te.load(model)
    sg = m.subgraphs[0]
    readers = te.consumers(sg)
    out = {}
    for i, t in enumerate(sg.tensors):
        v = te.constant(m, sg, i) if t.type in (0, 1) else None
        if v is not None and v.size >= 32:
            out[tuple(v.shape)] = (str(v.dtype), [te.op_name(m, sg.operators[k]) for k in readers.get(i, [])])
    return out


def test_int4_model_keeps_its_position_table_at_float16_behind_a_dequantize(float_model, samples):
    plain = _quantize(float_model, samples, P.HYBRID)  # not an int4 plan: left as the quantizer wrote it
    q = _quantize(float_model, samples, P.INT4)
    consts = _constants(q)
    # The 2048-value table: float16, read by a DEQUANTIZE of op version 3 (float16 input).
    assert consts[(1, SEQ, WIDTH)] == ("float16", ["DEQUANTIZE"])
    info = read_model(q)
    dq = [op for op in info.ops if op.name == "DEQUANTIZE"]
    assert len(dq) == 1 and dq[0].version == 3 and dq[0].inputs[0].dtype == "float16"
    assert dq[0].outputs[0].dtype == "float32" and not dq[0].outputs[0].is_constant
    # The 32-value scale stays float32 (too small to matter); the dynamic plan's table stays float32.
    assert consts[(WIDTH,)] == ("float32", ["MUL"])
    assert _constants(plain)[(1, SEQ, WIDTH)] == ("float32", ["ADD"])
    # The FCs' weights are int4 as planned (not touched), and the file is smaller by half the table.
    assert [op.precision for op in info.ops if op.name == "FULLY_CONNECTED"] == [P.INT4, P.INT4]
    again, halved = halve_float_constants(q)
    assert again == q and halved == []  # nothing left to halve
    unhalved = te.load(q)  # the same model with the table restored to float32, to compare
    sg = unhalved.subgraphs[0]
    dq_op = next(op for op in sg.operators if te.op_name(unhalved, op) == "DEQUANTIZE")
    table = te.constant(unhalved, sg, int(dq_op.inputs[0])).astype(np.float32)
    te.set_constant(unhalved, sg, int(dq_op.outputs[0]), table, new_buffer=True)
    sg.operators = [op for op in sg.operators if op is not dq_op]
    restored = te.pack(unhalved)
    assert len(restored) - len(q) >= SEQ * WIDTH * 2 - 256
    # Runs as before, with XNNPACK and with the builtin kernels: the table lost only float16 rounding.
    for xnnpack in (True, False):
        a, b = _run(q, samples, xnnpack), _run(restored, samples, xnnpack)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()


def test_a_weight_the_plan_keeps_float_is_not_halved(float_model, samples):
    """A float fallback (here the budget loop's) means float32 weights: they stay so."""
    fcs = [op for op in read_model(float_model).ops if op.name == "FULLY_CONNECTED"]
    q = _quantize(float_model, samples, P.INT4, {fcs[0].index: Override(P.FLOAT, "budget: kept float")})
    consts = _constants(q)
    assert consts[(256, WIDTH)] == ("float32", ["FULLY_CONNECTED"])  # the float FC's weight
    assert consts[(1, SEQ, WIDTH)] == ("float16", ["DEQUANTIZE"])


def test_a_float_model_halved_answers_within_float16_rounding(float_model, samples):
    """halve_float_constants on any model: the table only, the same outputs to float16 precision."""
    half, done = halve_float_constants(float_model)
    assert [(h.shape, h.saved) for h in done] == [((1, SEQ, WIDTH), SEQ * WIDTH * 2)]
    assert len(float_model) - len(half) >= SEQ * WIDTH * 2 - 256
    a, b = _run(half, samples), _run(float_model, samples)
    assert 0 < np.abs(a - b).max() <= 1e-3 * np.abs(b).max()


def test_a_finisher_sees_the_halved_model(float_model, samples):
    """GPTQ (the int4 level's finisher) runs on the layout that is written, so convert finds its
    report by the written model's key (run after the halving, its report keyed a model never written)."""
    from edgeq.litert_quant import Requantizer
    from edgeq.optimize import gptq_finisher, model_key

    reports: dict = {}
    rq = Requantizer(float_model, P.INT4, None, finish=gptq_finisher(float_model, lambda: samples, reports))
    plan = plan_precision(list(read_model(float_model).ops), None, None, scheme=P.INT4, min_weight_elements=0)
    out = rq.quantize(per_op_from_plan(plan))
    assert _constants(out)[(1, SEQ, WIDTH)] == ("float16", ["DEQUANTIZE"])
    assert model_key(out) in reports and reports[model_key(out)]["layers"]
