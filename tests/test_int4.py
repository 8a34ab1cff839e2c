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
from tests.conftest import build_int4_graph

P = Precision


@pytest.fixture(scope="module")
def float_model(tf):
    return build_int4_graph(tf)


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
    from edgeq.quiet import quiet_native

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


# --------------------------------------------------------------------------- int4 in the budget loop

def _outlier_mlp(tf):
    """FC 64->256 (ReLU) -> FC 256->256 (ReLU) -> FC 256->32, seeded. Each output channel of the
    first FC has one weight of 3.0 among N(0, 0.1) ones: channelwise int4 (scale 3/7) rounds the
    rest to 0 there, int8 (scale 3/127) keeps them. Measured: all int4 cosine 0.954, the first FC
    at int8 weights 0.985, the second or third instead 0.962 / 0.960, all three 0.9997."""
    from edgeq.signature import ensure_signature
    from edgeq.quiet import quiet_native

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.1, (64, 256)).astype(np.float32)
    w1[rng.integers(0, 64, 256), np.arange(256)] = 3.0
    w2 = rng.normal(0, 0.1, (256, 256)).astype(np.float32)
    w3 = rng.normal(0, 0.1, (256, 32)).astype(np.float32)

    @tf.function
    def fn(x):
        h = tf.nn.relu(tf.matmul(x, tf.constant(w1)))
        h = tf.nn.relu(tf.matmul(h, tf.constant(w2)))
        return tf.matmul(h, tf.constant(w3))

    with quiet_native():
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, 64], tf.float32))], fn)
        return ensure_signature(bytes(conv.convert()))[0]


def _budget(float_model, scheme, max_drop, samples, calib=None, max_bytes=None, overrides=None):
    """The budget loop from `scheme` (with plan `overrides`, as --max-size's mix gives it)."""
    from edgeq.accuracy_target import budget_target
    from edgeq.budget import BudgetContext, run_budget
    from edgeq.fidelity import fidelity, run_model
    from edgeq.litert_quant import Requantizer
    from edgeq.precision import Scheme

    scheme = Scheme(scheme)
    rq = Requantizer(float_model, scheme.op_precision, (lambda: iter(calib)) if calib else None, len(calib or ()))
    first = rq.quantize(per_op_from_plan(plan_precision(list(read_model(float_model).ops), None, overrides,
                                                        scheme=scheme, min_weight_elements=0)) if overrides else ())
    ref = run_model(float_model, samples)
    fid = fidelity(float_model, first, samples, ref)
    ctx = BudgetContext(read_model(float_model), None, scheme, rq, samples, ref, analysis_samples=lambda: samples[:8],
                        max_bytes=max_bytes, overrides=overrides or {})
    return run_budget(ctx, budget_target(max_drop, "cosine", fid), first, fid, True, None), first


@pytest.fixture(scope="module")
def outlier_mlp(tf):
    rng = np.random.default_rng(1)
    return _outlier_mlp(tf), [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(40)]


def test_budget_moves_the_damaging_int4_layer_to_int8(outlier_mlp):
    """Starting from int4, the loop moves the one layer whose int4 weights lose most (measured, not
    told) to int8 weights, keeps the others int4, and the file says so."""
    fm, samples = outlier_mlp
    result, first = _budget(fm, "int4", 0.02, samples)
    fcs = lambda m: [(op.precision, op.weight_block_size) for op in read_model(m).ops if op.name == "FULLY_CONNECTED"]
    assert fcs(first) == [(P.INT4, 0)] * 3
    assert fcs(result.model) == [(P.HYBRID, 0), (P.INT4, 0), (P.INT4, 0)]
    b = result.report
    assert b["met"] and b["loop"] and b["phases"] == ["int4 -> 8-bit"]
    assert b["steps"][0]["value"] == pytest.approx(0.954, abs=0.005) and not b["steps"][0]["met"]
    chosen = b["steps"][b["chosen_step"]]
    assert chosen["moved"] == [f"#{_fc_index(fm, 0)} FULLY_CONNECTED -> hybrid"] and chosen["hybrid"] == 1
    assert chosen["value"] == pytest.approx(0.985, abs=0.005) and chosen["bytes"] == len(result.model)
    assert chosen["bytes"] < 0.7 * len(quantize_per_op(fm, P.HYBRID, (), None))
    # Every step: what moved, the file's size and the fidelity it reached.
    assert all({"moved", "bytes", "value", "met"} <= set(s) for s in b["steps"])
    # Ranked by measuring each layer at 8 bits alone, end to end: FC1 alone buys ~0.03 cosine (0.954 -> 0.985).
    assert b["moves"][0]["phase"] == "int4 -> 8-bit" and b["moves"][0]["gain"] == pytest.approx(0.031, abs=0.005)
    assert "then 3 of 3 int4 layers at 8 bits alone, measured end to end" in b["analysis"]
    assert result.fidelity.outputs[0].cosine >= 0.98
    assert result.plan.mismatches(read_model(result.model)) == []
    reason = [e.reason for e in result.plan.entries if e.precision is P.HYBRID][0]
    assert reason == (f"accuracy budget: at 8 bits alone it brought the result {b['moves'][0]['gain']:.4f} closer to "
                      "the target (measured; most per byte first)")


def test_budget_under_a_size_cap_moves_only_what_fits(outlier_mlp):
    """--max-size bounds the loop: the damaging first FC (64x256: +8 KB at int8 weights) moves when
    the cap leaves 9 KB; with 5 KB left only the last FC (+4 KB) fits, which cannot meet the budget
    (0.960 < 0.98), so the loop fails naming what it reached within the size and the size where the
    budget is met, and writes nothing."""
    from edgeq.errors import QuantizationError

    fm, samples = outlier_mlp
    first = _budget(fm, "int4", 0.5, samples)[1]  # met as converted: just the all-int4 file
    result, _ = _budget(fm, "int4", 0.02, samples, max_bytes=len(first) + 9000)
    fcs = [op.precision for op in read_model(result.model).ops if op.name == "FULLY_CONNECTED"]
    assert fcs == [P.HYBRID, P.INT4, P.INT4] and len(result.model) <= len(first) + 9000
    assert result.report["max_bytes"] == len(first) + 9000
    assert all(s["bytes"] <= len(first) + 9000 for s in result.report["steps"])  # no probe over the cap
    with pytest.raises(QuantizationError) as e:
        _budget(fm, "int4", 0.02, samples, max_bytes=len(first) + 5000)
    msg = str(e.value)
    assert msg.startswith(f"accuracy budget not met within --max-size {(len(first) + 5000) / 1000:.1f} KB, "
                          "nothing written: best Identity cosine 0.96")
    assert "(needs >= 0.98) with 1 op(s) moved at " in msg and "1 probes" in msg
    # The size where the budget holds, from the loop run again without the cap: the first FC at 8 bits.
    from edgeq.size_goal import human_size
    assert msg.endswith(f"; it is met at {human_size(len(result.model))} (the loop without the size): raise "
                        "--max-size, or accept less with --max-drop 0.04 --metric cosine"), msg


def test_budget_probes_keep_the_size_mix_they_start_from(outlier_mlp):
    """--max-size first spends its room on int4 layers at 8 bits; the loop then starts from that file,
    and every probe keeps those layers (they were dropped once: MiniLM's probes came out smaller and
    worse than the first result they were measured against). Here the last FC is the mix; the loop
    adds the damaging first FC."""
    fm, samples = outlier_mlp
    plain = _budget(fm, "int4", 0.5, samples)[1]
    last = _fc_index(fm, 2)
    mix = {last: (P.HYBRID, "--max-size: room left for 8 bits")}
    cap = len(plain) + 4096 + 9000  # the last FC at 8 bits (+4 KB), then room for the first (+8 KB)
    result, first = _budget(fm, "int4", 0.02, samples, max_bytes=cap, overrides=mix)
    fcs = lambda m: [op.precision for op in read_model(m).ops if op.name == "FULLY_CONNECTED"]
    assert fcs(first) == [P.INT4, P.INT4, P.HYBRID]
    assert fcs(result.model) == [P.HYBRID, P.INT4, P.HYBRID] and len(result.model) <= cap
    steps = result.report["steps"]
    assert steps[0]["moved"] == [] and steps[0]["bytes"] == len(first)  # the mix is not the loop's move
    assert all(s["bytes"] > len(first) for s in steps[1:])  # every probe is the mix plus its moves
    assert result.plan.mismatches(read_model(result.model)) == []
    assert [e.reason for e in result.plan.entries if e.index == last][0] == "--max-size: room left for 8 bits"


def test_small_weights_stay_at_8_bits_in_int4_plans(tf, outlier_mlp):
    """int4 saves under 512 bytes on a weight of fewer than 1024 values, and small tables are where 4
    bits hurt most (MiniLM's 2x384 token-type table: cosine 0.020 by itself): the plan keeps them at
    the 8-bit fallback, says why, and the file agrees; 1024 values and more go int4."""
    from edgeq.signature import ensure_signature
    from edgeq.quiet import quiet_native

    rng = np.random.default_rng(4)
    w1 = tf.constant(rng.normal(0, 0.1, (64, 16)).astype(np.float32))  # 1024 values: int4
    w2 = tf.constant(rng.normal(0, 0.1, (16, 63)).astype(np.float32))  # 1008 values: 8 bits
    fn = tf.function(lambda x: tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2))
    with quiet_native():
        fm = ensure_signature(bytes(tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, 64], tf.float32))], fn).convert()))[0]
    plan, q, info = _quantize(fm, P.INT4, outlier_mlp[1][:4])
    assert [op.precision for op in info.ops if op.name == "FULLY_CONNECTED"] == [P.INT4, P.HYBRID]
    assert plan.mismatches(info) == []
    reason = [e.reason for e in plan.entries if e.op == "FULLY_CONNECTED"][1]
    assert "weight has 1008 elements (< 1024: int4 saves too little there), so hybrid" in reason


def _fc_index(fm, n):
    return [op.index for op in read_model(fm).ops if op.name == "FULLY_CONNECTED"][n]


def test_budget_goes_on_from_int8_to_float_when_int8_weights_are_not_enough(outlier_mlp):
    """Every int4 layer at int8 weights (cosine 0.99974) still misses a 0.0001 budget: phase 2 starts
    from there and moves the most damaging layer on to float (0.99993)."""
    fm, samples = outlier_mlp
    result, _ = _budget(fm, "int4", 0.0001, samples)
    b = result.report
    assert b["met"] and b["phases"] == ["int4 -> 8-bit", "8-bit -> hybrid/float"]
    assert [s["probe"] for s in b["steps"]][:2] == ["as converted", "every int4 layer to 8 bits (3)"]
    assert not b["steps"][1]["met"] and b["steps"][1]["hybrid"] == 3
    fcs = [op.precision for op in read_model(result.model).ops if op.name == "FULLY_CONNECTED"]
    assert fcs == [P.FLOAT, P.HYBRID, P.HYBRID]
    assert b["moved"] == {"ops": 3, "float": 1, "hybrid": 2}
    assert [m["phase"] for m in b["moves"]] == ["int4 -> 8-bit"] * 3 + ["8-bit -> hybrid/float"]
    assert result.fidelity.outputs[0].cosine >= 0.9999 and result.plan.mismatches(read_model(result.model)) == []


def test_int4_weight_error_ranks_what_rounding_loses():
    from edgeq.budget_moves import int4_weight_error

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (16, 64))
    plain = int4_weight_error(w, 0)
    assert 0.05 < plain < 0.2  # uniform 4-bit rounding of a normal row: ~0.12
    assert int4_weight_error(w, 32) < plain  # smaller blocks, finer scales
    w[:, 0] = 3.0  # one outlier per channel: the rest rounds to 0
    assert int4_weight_error(w, 0) > 0.2
    # ... which matters little when that input channel carries the signal, and a lot when it is quiet.
    loud, quiet = np.ones(64), np.ones(64)
    loud[0], quiet[0] = 100.0, 0.0
    assert int4_weight_error(w, 0, loud) < 0.05 < 0.9 < int4_weight_error(w, 0, quiet)


def test_measured_int4_order_ranks_by_gain_per_byte():
    """The int4 phase's order: measured gain per byte added, then unmeasured moves (time ran out) in
    the prior order, then moves that bought nothing."""
    from edgeq.budget_moves import Move, measured_int4_order

    a, b, c, d = (Move((i,), 0.5, 2) for i in range(4))  # prior order: a, b, c, d (own int4 error)
    gains = {0: 0.001, 1: 0.01, 2: -0.002, 3: 0.004}
    extra = {0: 1000, 1: 1000, 2: 10, 3: 100}
    ticks = []
    moves, measured = measured_int4_order([a, b, c, d], lambda mv: gains[mv.ops[0]], lambda mv: extra[mv.ops[0]],
                                          advance=ticks.append)
    assert [mv.ops[0] for mv in moves] == [3, 1, 0, 2] and measured == {(0,), (1,), (2,), (3,)}
    assert [mv.noise for mv in moves] == [0.004, 0.01, 0.001, -0.002] and len(ticks) == 4
    moves, measured = measured_int4_order([a, b, c, d], lambda mv: gains[mv.ops[0]], lambda mv: extra[mv.ops[0]],
                                          seconds=-1)
    assert moves == [a, b, c, d] and measured == set()


def test_requantizer_knows_int4x8_is_static_and_the_loop_moves_it_to_int8(float_model, samples, outlier_mlp):
    """int4x8 has int8 activations: the requantizer calibrates (once) for it, and the budget loop's
    first phase moves int4x8 layers to full int8."""
    from edgeq.litert_quant import Requantizer

    walks = []
    rq = Requantizer(float_model, P.INT4X8, lambda: walks.append(1) or iter(samples), len(samples))
    assert rq.static and not Requantizer(float_model, P.INT4, None).static
    q = rq.quantize(())
    rq.quantize(())
    assert len(walks) == 2 and rq.quantizations == 2  # one calibration: the quantizer walks the samples twice
    assert [op.precision for op in read_model(q).ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                     "FULLY_CONNECTED")] == [P.INT4X8, P.INT8,
                                                                                             P.INT4X8, P.INT4X8]
    fm, xs = outlier_mlp
    result, first = _budget(fm, "int4x8", 0.03, xs, calib=xs)
    assert [op.precision for op in read_model(first).ops if op.name == "FULLY_CONNECTED"] == [P.INT4X8] * 3
    fcs = [op.precision for op in read_model(result.model).ops if op.name == "FULLY_CONNECTED"]
    assert fcs[0] is P.INT8 and P.INT4X8 in fcs, (fcs, result.report["steps"])
    assert result.report["phases"] == ["int4 -> 8-bit"]


def test_convert_with_an_int4_scheme_and_max_drop_writes_the_mix(outlier_mlp, tmp_path):
    """edgeq convert --scheme int4 --max-drop 0.02: the written file and its manifest hold the mix."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import BudgetOptions, ConvertOptions, convert
    from edgeq.precision import Scheme

    fm, _ = outlier_mlp
    (tmp_path / "m.tflite").write_bytes(fm)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(120, 64)).astype(np.float32))
    r = convert(tmp_path / "m.tflite", ConvertOptions(tmp_path / "q.tflite", Scheme.INT4,
                                                      calib=CalibrationConfig(str(tmp_path / "x.npy")),
                                                      budget=BudgetOptions(0.02, "cosine")))
    b = r.manifest["budget"]
    assert b["met"] and b["phases"] == ["int4 -> 8-bit"] and b["moved"]["hybrid"] == 1
    fcs = [op.precision for op in read_model(tmp_path / "q.tflite").ops if op.name == "FULLY_CONNECTED"]
    assert fcs == [P.HYBRID, P.INT4, P.INT4]
    assert [e["precision"] for e in r.manifest["plan"]["ops"] if e["op"] == "FULLY_CONNECTED"] == ["hybrid", "int4", "int4"]
