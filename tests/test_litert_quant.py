"""Recipe lines per precision (litert_quant.op_config / recipe_lines / build_recipe): the exact JSON
the LiteRT quantizer is given. The quantized files themselves are checked in tests/test_int4.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import QuantizationError
from edgeq.litert_quant import OpPrecision, build_recipe, effective_precision, int4_ops, op_config, recipe_lines
from edgeq.precision import INT4_BLOCK_SIZE, INT4_PRECISIONS, RECIPE_PRECISIONS, Precision
from edgeq.tflite_model import read_model

P = Precision


def _w(cfg):
    w = cfg["weight_tensor_config"]
    return w["num_bits"], w["granularity"]


@pytest.mark.parametrize("precision,weights,act_bits,compute,dequant", [
    (P.INT8, (8, "CHANNELWISE"), 8, "INTEGER", False),
    (P.INT16X8, (8, "CHANNELWISE"), 16, "INTEGER", False),
    (P.HYBRID, (8, "CHANNELWISE"), None, "INTEGER", False),
    (P.INT4, (4, "CHANNELWISE"), None, "INTEGER", False),
    (P.INT4_B32, (4, "BLOCKWISE_32"), None, "INTEGER", False),
    (P.INT4_B64, (4, "BLOCKWISE_64"), None, "INTEGER", False),
    (P.INT4_B128, (4, "BLOCKWISE_128"), None, "INTEGER", False),
    (P.INT4_B256, (4, "BLOCKWISE_256"), None, "INTEGER", False),
    (P.INT4X8, (4, "CHANNELWISE"), 8, "INTEGER", False),
    # weight-only: an explicit DEQUANTIZE and float compute (the slow path on CPUs)
    (P.INT4_WEIGHT_ONLY, (4, "CHANNELWISE"), None, "FLOAT", True),
])
def test_op_config_per_precision(precision, weights, act_bits, compute, dequant):
    algo, cfg = op_config(precision, "FULLY_CONNECTED")
    assert algo == "min_max_uniform_quantize"
    assert _w(cfg) == weights and cfg["weight_tensor_config"]["symmetric"] is True
    assert cfg.get("activation_tensor_config", {}).get("num_bits") == act_bits
    assert cfg["compute_precision"] == compute and cfg["explicit_dequantize"] is dequant
    assert cfg["min_weight_elements"] == 0 and cfg["skip_checks"] is False


def test_every_recipe_precision_has_a_line_and_the_rest_are_refused():
    assert op_config(P.FLOAT) == ("no_quantize", {})
    for p in RECIPE_PRECISIONS:
        op_config(p)
    for p in (P.FP16, P.OTHER):
        with pytest.raises(QuantizationError, match=f"precision '{p}' is not one of int8, int16x8, hybrid, float, int4"):
            op_config(p)


def test_int4x8_activations_follow_the_int8_symmetry_rule():
    assert op_config(P.INT4X8, "FULLY_CONNECTED")[1]["activation_tensor_config"]["symmetric"] is False
    assert op_config(P.INT4X8, "BATCH_MATMUL")[1]["activation_tensor_config"]["symmetric"] is True


def test_int4_for_every_op_is_the_8bit_fallback_then_int4_where_the_quantizer_has_it():
    lines = recipe_lines(".*", "*", P.INT4_B32)
    assert [(l["operation"], _w(l["op_config"])) for l in lines] == [
        ("*", (8, "CHANNELWISE")), ("EMBEDDING_LOOKUP", (4, "BLOCKWISE_32")), ("FULLY_CONNECTED", (4, "BLOCKWISE_32"))]
    static = recipe_lines(".*", "*", P.INT4X8)
    assert [(l["operation"], _w(l["op_config"])) for l in static] == [
        ("*", (8, "CHANNELWISE")), ("BATCH_MATMUL", (8, "TENSORWISE")),  # int8's BMM line
        ("CONV_2D", (4, "CHANNELWISE")), ("FULLY_CONNECTED", (4, "CHANNELWISE"))]
    assert all("activation_tensor_config" in l["op_config"] for l in static)
    # One op without an int4 recipe gets its fallback, not a line the quantizer would ignore.
    (dw,) = recipe_lines(".*", "DEPTHWISE_CONV_2D", P.INT4)
    assert _w(dw["op_config"]) == (8, "CHANNELWISE") and "activation_tensor_config" not in dw["op_config"]


def test_effective_precision_and_quantizer_int4_ops():
    assert int4_ops(P.INT4) == {"FULLY_CONNECTED", "EMBEDDING_LOOKUP", "CONV_2D"}
    assert int4_ops(P.INT4_B128) == {"FULLY_CONNECTED", "EMBEDDING_LOOKUP"}
    assert int4_ops(P.INT4X8) == {"FULLY_CONNECTED", "CONV_2D"}
    assert int4_ops(P.HYBRID) == frozenset()
    assert effective_precision(P.INT4_B64, "CONV_2D") is P.HYBRID  # no blockwise conv
    # a constant table: the 8-bit fallback is hybrid, which the LiteRT quantizer has no recipe for
    # on GATHER (its dynamic_wi8_afp32 list): the table stays float (EMBEDDING_LOOKUP has one)
    assert effective_precision(P.INT4, "GATHER") is P.FLOAT
    assert effective_precision(P.INT4, "EMBEDDING_LOOKUP") is P.INT4
    assert effective_precision(P.INT4, "ADD") is P.FLOAT  # no weight at all
    assert effective_precision(P.INT4X8, "DEPTHWISE_CONV_2D") is P.INT8
    assert effective_precision(P.INT4_WEIGHT_ONLY, "DEPTHWISE_CONV_2D") is P.FLOAT
    assert all(effective_precision(p, "FULLY_CONNECTED") is p for p in INT4_PRECISIONS)


def test_build_recipe_mixes_int4_and_int8_per_op():
    scopes = {"fc1": "fc1;", "fc2": "fc2;", "conv": "conv;"}
    recipe = build_recipe(P.INT4, [OpPrecision("FULLY_CONNECTED", "fc1", P.INT4),  # = default: no line
                                   OpPrecision("FULLY_CONNECTED", "fc2", P.HYBRID),  # moved to int8 weights
                                   OpPrecision("CONV_2D", "conv", P.INT4_B32)], scopes)  # no blockwise conv
    assert [(l["operation"], _w(l["op_config"])) for l in recipe[:4]] == [
        ("*", (8, "CHANNELWISE")), ("CONV_2D", (4, "CHANNELWISE")), ("EMBEDDING_LOOKUP", (4, "CHANNELWISE")),
        ("FULLY_CONNECTED", (4, "CHANNELWISE"))]
    # fc2 moves to int8 weights; the conv asked for blockwise int4 gets int8 weights rather than
    # being silently left float by the quantizer (it has no blockwise CONV_2D).
    per_op = [(l["regex"], _w(l["op_config"])) for l in recipe[4:]]
    assert per_op == [("^fc2;$", (8, "CHANNELWISE")), ("^conv;$", (8, "CHANNELWISE"))]
    assert INT4_BLOCK_SIZE[P.INT4_B32] == 32


def _bmm_graph(tf):
    """x [1, 2, 4, 8] @ a batched constant [2, 8, 16] (channel scales 0.01-3): the converter keeps it a
    BATCH_MATMUL with a constant right-hand side (a 2-D constant would become FULLY_CONNECTED)."""
    from edgeq.quiet import quiet_native
    from edgeq.signature import ensure_signature

    rng = np.random.default_rng(0)
    w = tf.constant((rng.normal(size=(2, 8, 16)) * rng.uniform(0.01, 3, size=(1, 1, 16))).astype(np.float32))

    @tf.function
    def fn(x):
        return tf.nn.relu(tf.matmul(x, w))

    with quiet_native():
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, 2, 4, 8], tf.float32))], fn)
        return ensure_signature(bytes(conv.convert()))[0]


@pytest.mark.parametrize("precision,scales", [(P.INT8, 1), (P.INT16X8, 1), (P.HYBRID, 16)])
def test_batch_matmul_constant_weights_are_per_tensor_and_answer(tf, precision, scales):
    """With per-channel scales on its constant right-hand side, LiteRT's int8 and int16x8
    BATCH_MATMUL output zeros (cosine 0.0 here under both kernels; openWakeWord's melspectrogram
    filter bank: 0.0000 to float). Read back: one scale for those (hybrid keeps its per-channel
    scales, which it runs right); under XNNPACK and the builtin kernels: the float answer."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from edgeq.litert_quant import quantize_per_op

    fm = _bmm_graph(tf)
    rng = np.random.default_rng(1)
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    samples = [{key: rng.normal(size=(1, 2, 4, 8)).astype(np.float32)} for _ in range(16)]
    q = quantize_per_op(fm, precision, [], samples)
    (bmm,) = [op for op in read_model(q).ops if op.name == "BATCH_MATMUL"]
    assert bmm.inputs[1].dtype == "int8" and bmm.inputs[1].is_constant
    assert len(bmm.inputs[1].scale) == scales
    for kw in ({}, {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}):
        f, g = (np.concatenate([next(iter(Interpreter(model_content=m, **kw).get_signature_runner()(**s).values()))
                                .ravel() for s in samples]) for m in (fm, q))
        assert float(f @ g / (np.linalg.norm(f) * np.linalg.norm(g))) > 0.98, (precision, kw)  # 0.991-0.99998


def test_ops_of_one_kind_at_one_precision_share_a_recipe_line(tf):
    """A budget probe of a CRNN with 511 unrolled LSTM layers wrote a recipe line per moved op; the
    quantizer tries every line's regex on every op and Python caches 512 patterns, so one probe ran
    for over 15 minutes. One line per (op kind, precision): both FCs moved to hybrid share a line, the
    conv moved to float has its own, a later entry for an op wins, and the file read back has each op
    at its planned precision."""
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.litert_quant import op_scopes, quantize_per_op
    from tests.conftest import build_int4_graph

    fm = build_int4_graph(tf)
    ops = read_model(fm).ops
    out = {op.name: [o.outputs[0].name for o in ops if o.name == op.name] for op in ops}
    per_op = [OpPrecision("CONV_2D", out["CONV_2D"][0], P.HYBRID),  # overridden below: later wins
              *(OpPrecision("FULLY_CONNECTED", o, P.HYBRID) for o in out["FULLY_CONNECTED"]),
              OpPrecision("CONV_2D", out["CONV_2D"][0], P.FLOAT)]
    recipe = build_recipe(P.INT8, per_op, op_scopes(fm))
    fc_lines = [l for l in recipe if l["operation"] == "FULLY_CONNECTED"]
    assert len(fc_lines) == 1 and fc_lines[0]["regex"].startswith("^(?:") and fc_lines[0]["regex"].count("|") == 1
    assert [l["algorithm_key"] for l in recipe if l["operation"] == "CONV_2D"] == ["no_quantize"]
    rng = np.random.default_rng(1)
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    samples = [{key: rng.normal(size=(1, 8, 8, 16)).astype(np.float32)} for _ in range(4)]
    info = read_model(quantize_per_op(fm, P.INT8, per_op, samples))
    assert {op.name: str(op.precision) for op in info.ops if op.name in out} == {
        "CONV_2D": "float", "DEPTHWISE_CONV_2D": "int8", "MEAN": "int8", "FULLY_CONNECTED": "hybrid"}


def test_hybrid_on_an_op_the_quantizer_has_no_hybrid_recipe_for_is_float(tf, tmp_path):
    """The accuracy-budget loop moved a text model's embedding GATHER to hybrid (the TFLite
    converter can store a GATHER table as int8) and the LiteRT quantizer refused the plan, "Unsupported
    op for INTEGER: GATHER", which ended the conversion. Its hybrid ops are its dynamic_wi8_afp32
    list; elsewhere hybrid means float, and the plan quantizes: GATHER float, the Dense int8."""
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.litert_quant import effective_precision, quantize_per_op, quantizer_hybrid_ops
    from edgeq.sources import load_source
    from tests.conftest import save_keras

    assert "GATHER" not in quantizer_hybrid_ops() and "FULLY_CONNECTED" in quantizer_hybrid_ops()
    assert effective_precision(P.HYBRID, "GATHER") is P.FLOAT
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((10,), dtype="int32")
    x = tf.keras.layers.Flatten()(tf.keras.layers.Embedding(30, 4)(inp))
    fm = load_source(save_keras(tf, tf.keras.Model(inp, tf.keras.layers.Dense(3)(x)), tmp_path / "e.keras")).float_tflite
    gather = next(op for op in read_model(fm).ops if op.name == "GATHER")
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    samples = [{key: np.random.default_rng(i).integers(0, 30, (1, 10)).astype(np.int32)} for i in range(8)]
    q = quantize_per_op(fm, P.INT8, [OpPrecision("GATHER", gather.outputs[0].name, P.HYBRID)], samples)
    got = {op.name: str(op.precision) for op in read_model(q).ops if op.name in ("GATHER", "FULLY_CONNECTED")}
    assert got == {"GATHER": "float", "FULLY_CONNECTED": "int8"}


def test_a_transpose_conv_line_reaches_the_quantizer(tf, tmp_path):
    """The LiteRT quantizer calls TRANSPOSE_CONV "CONV_2D_TRANSPOSE": a recipe line under the TFLite
    name matched nothing, so a plan (or a budget probe) putting a decoder's TRANSPOSE_CONV float or
    hybrid got int8 and the plan disagreed with the file."""
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.litert_quant import quantize_per_op, quantizer_hybrid_ops, quantizer_int8_ops
    from edgeq.sources import load_source
    from tests.conftest import save_keras

    assert "TRANSPOSE_CONV" in quantizer_int8_ops() and "CONV_2D_TRANSPOSE" not in quantizer_int8_ops()
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((4, 4, 3))
    x = tf.keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(tf.keras.layers.Conv2D(4, 3, padding="same")(inp))
    fm = load_source(save_keras(tf, tf.keras.Model(inp, tf.keras.layers.Conv2D(2, 1)(x)), tmp_path / "d.keras")).float_tflite
    tconv = next(op for op in read_model(fm).ops if op.name == "TRANSPOSE_CONV")
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    samples = [{key: np.random.default_rng(i).normal(size=(1, 4, 4, 3)).astype(np.float32)} for i in range(8)]
    for precision in (P.FLOAT, P.HYBRID):
        q = quantize_per_op(fm, P.INT8, [OpPrecision("TRANSPOSE_CONV", tconv.outputs[0].name, precision)], samples)
        got = [op.precision for op in read_model(q).ops if op.name == "TRANSPOSE_CONV"]
        want = P.HYBRID if "TRANSPOSE_CONV" in quantizer_hybrid_ops() and precision is P.HYBRID else P.FLOAT
        assert got == [want], (precision, got)


def test_a_model_with_a_while_loop_the_quantizer_cannot_calibrate_says_what_to_do(tf, tmp_path):
    """human-models' handtrack SavedModel keeps its per-class NMS in a WHILE loop: the LiteRT quantizer
    reads no tensor inside it ("Tensor data is null. Run allocate_tensors() first", a traceback from
    the level before). One line now, naming the loop and the way out; nothing written. Built here the
    same way (a tf.map_fn of NMS over class columns), seeded."""
    from click.testing import CliRunner

    from edgeq.cli import main
    from edgeq.quiet import quiet_native

    rng = np.random.default_rng(0)
    k = tf.constant(rng.normal(0, .1, (3, 3, 3, 8)).astype(np.float32))
    kb = tf.constant(rng.normal(0, .1, (1, 1, 8, 7)).astype(np.float32))

    class Detector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32)])
        def serve(self, x):
            h = tf.reshape(tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME")), kb, 1, "SAME"), [-1, 7])
            boxes, scores = tf.sigmoid(h[:, :4]), tf.sigmoid(h[:, 4:])

            def per_class(s):
                sel = tf.gather(s, tf.image.non_max_suppression(boxes, s, 10, 0.5, 0.3))
                return tf.pad(sel, [[0, 10 - tf.shape(sel)[0]]])

            top = tf.map_fn(per_class, tf.transpose(scores), fn_output_signature=tf.TensorSpec([10], tf.float32))
            return {"scores": top[None], "raw": scores[None]}

    m = Detector()
    with quiet_native():
        tf.saved_model.save(m, str(tmp_path / "det"), signatures={"serving_default": m.serve})
    np.save(tmp_path / "x.npy", rng.uniform(0, 1, (40, 32, 32, 3)).astype(np.float32))
    out = tmp_path / "q.tflite"
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "det"), "-o", str(out), "--calib", str(tmp_path / "x.npy"),
                                  "--quiet"])
    assert r.exit_code == 1 and not out.exists() and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "the model has a WHILE/IF loop" in r.output and "other steps outside the model" in r.output
