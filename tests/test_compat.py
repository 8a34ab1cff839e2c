"""Compatibility checks against device profiles, on real converter output and real runtimes.

The op-version mismatch is real: TF 2.21 writes dynamic-range FULLY_CONNECTED as v12, and the
rpi4 profile's table (measured from the tflite-runtime 2.14.0 wheel) stops at v10. The shipped
ai-edge-litert 2.3.0 table is re-checked here against the real interpreter in the venv.
"""

from __future__ import annotations

import json

import pytest

from edgeq.compat import OpStatus, check_model
from edgeq.errors import IncompatibleModelError, ModelFormatError
from edgeq.profiles import load_profile
from edgeq.tflite_model import read_ops


def _convert(tf, model, mode="float"):
    import numpy as np
    from edgeq.quiet import quiet_native

    with quiet_native():
        c = tf.lite.TFLiteConverter.from_keras_model(model)
        if mode in ("dynamic", "int8"):
            c.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "int8":
            rng = np.random.default_rng(0)
            shape = (1, *model.input_shape[1:])
            c.representative_dataset = lambda: ([rng.standard_normal(shape).astype(np.float32)] for _ in range(16))
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            c.inference_input_type = c.inference_output_type = tf.int8
        return c.convert()


@pytest.fixture(scope="module")
def mlp(tf):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((64,))
    out = tf.keras.layers.Dense(4)(tf.keras.layers.Dense(64, activation="relu")(inp))
    return tf.keras.Model(inp, out)


def one_op_model(op_name: str, version: int, custom_code: str | None = None) -> bytes:
    """A one-op .tflite (float32 [1,4] in and out) built with the LiteRT schema: only the op code
    and version matter to op registration, which happens before any kernel runs."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    code = getattr(s.BuiltinOperator, op_name)
    oc = s.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
    if custom_code:
        oc.customCode = custom_code
    tensors = []
    for i in range(2):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 4], s.TensorType.FLOAT32, 0, f"t{i}"
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    sg = s.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators = tensors, [0], [1], [op]
    m = s.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, [oc], [sg], [s.BufferT()]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_real_op_version_mismatch_on_rpi4(tf, mlp):
    model = _convert(tf, mlp, "dynamic")
    versions = {o.version for o in read_ops(model) if o.name == "FULLY_CONNECTED"}
    assert versions and min(versions) >= 12  # per-channel dynamic-range FC, read back from the file
    v = min(versions)

    report = check_model(model, load_profile("rpi4"), name="mlp_dynamic.tflite")
    assert not report.ok
    assert [o.status for o in report.ops] == [OpStatus.UNSUPPORTED] * 2
    assert report.ops[0].reason == f"FULLY_CONNECTED v{v} > tflite-runtime 2.14.0 max v10"
    assert report.summary.startswith("rpi4 (tflite-runtime 2.14.0): NOT OK - 0 ok, 0 fallback, 2 unsupported")
    table = report.describe().splitlines()
    assert table[0] == report.summary and table[2].split() == ["#", "op", "ver", "precision", "status", "runs", "on",
                                                               "reason"]
    assert table[3].split()[:6] == ["0", "FULLY_CONNECTED", f"v{v}", "hybrid", "unsupported", "-"]
    with pytest.raises(IncompatibleModelError) as e:
        report.raise_if_incompatible()
    msg = str(e.value)
    assert msg.startswith(f"mlp_dynamic.tflite: 2 op(s) cannot run on rpi4 (FULLY_CONNECTED v{v} > tflite-runtime")
    assert msg.endswith("or pass --allow-incompatible") and "\n" not in msg
    report.raise_if_incompatible(allow_incompatible=True)  # convert --allow-incompatible

    # The same file is fine for a LiteRT 2.3 target, and the real LiteRT 2.3 interpreter agrees.
    rpi5 = check_model(model, load_profile("rpi5"))
    assert rpi5.ok and not rpi5.unsupported
    assert {o.precision for o in rpi5.fallbacks} == {"hybrid", "float"}  # not int8: planned hybrid
    from ai_edge_litert.interpreter import Interpreter
    Interpreter(model_content=model).allocate_tensors()


def test_shipped_litert_table_matches_the_real_interpreter():
    """The ai-edge-litert 2.3.0 table says FULLY_CONNECTED max v14 and no GELU v3: ask the runtime."""
    from ai_edge_litert.interpreter import Interpreter

    host = load_profile("host-x86_64")
    for op in ("FULLY_CONNECTED", "CONV_2D", "GELU", "SOFTMAX"):
        top = host.op_versions[op]
        Interpreter(model_content=one_op_model(op, top))  # registered: loads
        with pytest.raises(ValueError, match=f"Didn't find op for builtin opcode '{op}' version '{top + 1}'"):
            Interpreter(model_content=one_op_model(op, top + 1))
    assert check_model(one_op_model("FULLY_CONNECTED", host.op_versions["FULLY_CONNECTED"] + 1),
                       host).unsupported


def test_int8_model_runs_int8_on_rpi4(tf, mlp):
    model = _convert(tf, mlp, "int8")
    report = check_model(model, load_profile("rpi4"))
    assert report.ok and report.notes == ()
    assert [(o.op, o.precision, o.status, o.placement) for o in report.ops] == [
        ("FULLY_CONNECTED", "int8", OpStatus.OK, "cpu")] * 2
    assert report.ops[0].reason == "runs int8 on the CPU (tflite-runtime 2.14.0)"
    assert report.fits_memory and report.size_bytes == len(model)


def test_float_model_on_cpu_target_reports_precision_fallbacks(tf, mlp):
    model = _convert(tf, mlp, "float")
    report = check_model(model, load_profile("rpi4"))
    assert report.ok  # it runs, just not quantized
    assert [o.status for o in report.ops] == [OpStatus.FALLBACK] * 2
    assert report.ops[0].reason == "runs float on the CPU (tflite-runtime 2.14.0), not int8"
    assert "target wants int8 inputs; model has float32" in report.notes


def test_edgetpu_splits_at_the_first_unsupported_op(tf):
    tf.keras.utils.set_random_seed(2)
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = tf.keras.layers.Lambda(tf.exp)(x)  # not in the Edge TPU table
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(x)
    model = _convert(tf, tf.keras.Model(inp, x), "int8")
    report = check_model(model, load_profile("coral-edgetpu"))
    assert [(o.op, o.status, o.placement) for o in report.ops] == [
        ("CONV_2D", OpStatus.OK, "accelerator"),
        ("EXP", OpStatus.FALLBACK, "cpu"),
        ("CONV_2D", OpStatus.FALLBACK, "cpu")]
    assert report.ops[1].reason == "runs on the CPU: Edge TPU does not support EXP"
    assert "the rest of the graph runs on the CPU" in report.ops[2].reason
    assert report.delegate_coverage == pytest.approx(1 / 3)
    assert any("not compiled for the Edge TPU yet" in n for n in report.notes)
    assert any("no op-version table for tflite-runtime 2.5.0.post1" in n for n in report.notes)
    assert report.ok  # runs, mostly on the CPU
    # a third on an accelerator without a minimum of its own: said aloud (convert warns), naming where it stops
    assert report.low_coverage == ("only 33% of ops on the Edge TPU: the rest run on the CPU; the first op it does "
                                   "not take: #1 EXP (runs on the CPU: Edge TPU does not support EXP)")


def test_a_requantizing_quantize_stays_on_the_edge_tpu(tf, tmp_path):
    """Where a CONCATENATION's input is read elsewhere too, the quantizer requantizes it with an int8
    -> int8 QUANTIZE. The first compilers' table had no QUANTIZE, so HED and BlazeFace for the Edge
    TPU were cut there (everything after it on the CPU, the plan saying all on the TPU); the Edge TPU
    Compiler maps it (14.1's logs: 'Mapped to Edge TPU')."""
    import numpy as np

    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.precision import IoType

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    inp = tf.keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inp)
    joined = L.Concatenate()([a, L.Conv2D(4, 3, padding="same", activation="relu")(inp)])
    out = L.Conv2D(2, 1)(L.Concatenate()([joined, L.Conv2D(4, 1)(a)]))
    tf.keras.Model(inp, out).save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype(np.float32))
    r = convert(tmp_path / "m.keras", ConvertOptions(tmp_path / "o.tflite", device="coral-edgetpu",
                                                       calib=CalibrationConfig(str(tmp_path / "x.npy"), 48, 16)))
    report = check_model((tmp_path / "o.tflite").read_bytes(), load_profile("coral-edgetpu"))
    quantize = [o for o in report.ops if o.op == "QUANTIZE"]
    assert quantize and all(o.placement == "accelerator" and o.reason == "runs on the Edge TPU" for o in quantize)
    assert all(o.placement == "accelerator" for o in report.ops) and report.delegate_coverage == 1.0
    assert r.manifest["compatibility"]["delegate_coverage"] == 1.0
    # A float model input's QUANTIZE is not the Edge TPU's: it takes no float tensors.
    convert(tmp_path / "m.keras", ConvertOptions(tmp_path / "f.tflite", device="coral-edgetpu", io=IoType.FLOAT32,
                                                 calib=CalibrationConfig(str(tmp_path / "x.npy"), 48, 16)))
    report = check_model((tmp_path / "f.tflite").read_bytes(), load_profile("coral-edgetpu"))
    first = report.ops[0]
    assert (first.op, first.placement) == ("QUANTIZE", "cpu") and "takes no float tensors" in first.reason
    assert report.delegate_coverage == 1.0  # an I/O conversion: not counted, no cut


def test_an_edge_tpu_graph_cut_late_is_said(tf):
    """HED for the Edge TPU was cut at a requantizing QUANTIZE with most ops before it: above the
    low-coverage line, so convert said nothing. A single-segment accelerator's cut is always named."""
    tf.keras.utils.set_random_seed(2)
    inp = tf.keras.Input((8, 8, 1))
    x = inp
    for _ in range(4):
        x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(tf.keras.layers.Lambda(tf.exp)(x))
    report = check_model(_convert(tf, tf.keras.Model(inp, x), "int8"), load_profile("coral-edgetpu"))
    assert report.delegate_coverage == pytest.approx(4 / 6)
    assert report.low_coverage == ("the Edge TPU graph stops at #4 EXP (runs on the CPU: Edge TPU does not support "
                                   "EXP): it and the 1 op(s) after it run on the CPU (67% on the Edge TPU)")
    assert report.low_coverage in report.notes


def test_nnapi_version_limit_and_coverage_note(tf, mlp):
    model = _convert(tf, mlp, "dynamic")  # FC v12 > NNAPI's v5
    report = check_model(model, load_profile("android-nnapi"))
    assert all(o.status is OpStatus.FALLBACK and o.placement == "cpu" for o in report.ops)
    assert report.ops[0].reason == f"runs on the CPU: FULLY_CONNECTED v{report.ops[0].version} > NNAPI max v5"
    assert report.delegate_coverage == 0.0
    assert any("the benchmark runner will refuse this model" in n for n in report.notes)


def test_custom_and_unregistered_ops():
    rpi4 = load_profile("rpi4")
    custom = check_model(one_op_model("CUSTOM", 1, "MyFancyOp"), rpi4)
    assert custom.ops[0].status is OpStatus.UNSUPPORTED
    assert custom.ops[0].reason == "custom op 'MyFancyOp' is not built into tflite-runtime 2.14.0"
    hlo = check_model(one_op_model("STABLEHLO_ADD", 1), rpi4)
    assert hlo.ops[0].reason == "STABLEHLO_ADD is not registered in tflite-runtime 2.14.0" and not hlo.ok
    # The Edge TPU runtime provides the op its compiler emits.
    tpu = check_model(one_op_model("CUSTOM", 1, "edgetpu-custom-op"), load_profile("coral-edgetpu"))
    assert (tpu.ops[0].status, tpu.ops[0].placement) == (OpStatus.OK, "accelerator")
    assert not any("not compiled" in n for n in tpu.notes)


def test_model_bigger_than_the_memory_budget(tmp_path, tf):
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((512,))
    model = _convert(tf, tf.keras.Model(inp, tf.keras.layers.Dense(512)(inp)), "float")  # ~1 MB of weights
    text = load_profile("rpi-zero2w").path.read_text()
    text = text.replace('id = "rpi-zero2w"', 'id = "tiny"').replace("ram_mb = 512", "ram_mb = 1")
    (tmp_path / "tiny.toml").write_text(text)
    report = check_model(model, load_profile("tiny", devices_dir=tmp_path), name="big.tflite")
    assert not report.fits_memory and not report.ok and not report.unsupported
    assert "over the 512.0 KB budget" in report.summary
    with pytest.raises(IncompatibleModelError, match=r"big\.tflite: 1\.0 MB exceeds tiny's budget of 512\.0 KB"):
        report.raise_if_incompatible()
    assert check_model(model, load_profile("rpi-zero2w")).fits_memory


def test_report_json_and_bad_input(tmp_path, tf, mlp):
    report = check_model(_convert(tf, mlp, "int8"), load_profile("android-qnn-htp"))
    d = json.loads(json.dumps(report.to_json()))
    assert d["ok"] is True and d["delegate_coverage"] == 1.0 and d["accelerator"] == "Qualcomm HTP (QNN)"
    assert [o["placement"] for o in d["ops"]] == ["accelerator", "accelerator"]
    bad = tmp_path / "not_a_model.tflite"
    bad.write_bytes(b"hello world, not a flatbuffer")
    with pytest.raises(ModelFormatError, match="not a TFLite flatbuffer"):
        check_model(bad, load_profile("rpi4"))


@pytest.fixture(scope="module")
def int4_models(tf):
    """A seeded CONV_2D + Dense model quantized by the real LiteRT quantizer at int4 precisions."""
    from edgeq.litert_quant import quantize_per_op
    from edgeq.signature import ensure_signature

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 16))
    h = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
    out = tf.keras.layers.Dense(64)(tf.keras.layers.GlobalAveragePooling2D()(h))
    fm = ensure_signature(_convert(tf, tf.keras.Model(inp, out)))[0]
    return {p: quantize_per_op(fm, p, (), None) for p in ("int4", "int4-b32", "int4-weight-only")}


def test_int4_model_refused_where_the_runtime_has_no_int4_kernel(int4_models):
    from click.testing import CliRunner

    from edgeq.cli import main

    # tflite-runtime 2.14 (rpi4): dynamic int4 CONV_2D computes NaN (measured); int4 FC runs.
    report = check_model(int4_models["int4"], load_profile("rpi4"), name="m.tflite")
    assert [(o.op, o.status) for o in report.unsupported] == [("CONV_2D", OpStatus.UNSUPPORTED)]
    assert [o.precision for o in report.ops if o.op == "FULLY_CONNECTED"] == ["int4"]
    with pytest.raises(IncompatibleModelError, match=r"m\.tflite: 1 op\(s\) cannot run on rpi4 \(tflite-runtime 2\.14\.0 "
                                                     r"has no int4 kernel for CONV_2D"):
        report.raise_if_incompatible()
    # LiteRT 2.3 (host) runs it all.
    assert check_model(int4_models["int4"], load_profile("host-x86_64")).unsupported == []
    # Blockwise FC on the Pi: the 2.14 kernel crashes the process, so it is refused before it runs.
    b32 = check_model(int4_models["int4-b32"], load_profile("rpi4"))
    assert [o.op for o in b32.unsupported] == ["FULLY_CONNECTED"] and "SIGSEGV" in b32.unsupported[0].reason
    # `edgeq devices check`: exit 1, the verdict in the first line.
    with CliRunner().isolated_filesystem():
        with open("m.tflite", "wb") as f:
            f.write(int4_models["int4"])
        res = CliRunner().invoke(main, ["devices", "check", "m.tflite", "--device", "rpi4"])
    assert res.exit_code == 1
    assert res.output.splitlines()[0].startswith(
        "rpi4 (tflite-runtime 2.14.0): NOT OK - 0 ok, 2 fallback, 1 unsupported of 3 ops; cannot run: "
        "tflite-runtime 2.14.0 has no int4 kernel for CONV_2D")


def test_weight_only_int4_is_refused_on_the_pi_and_flagged_slow_on_the_host(int4_models):
    pi = check_model(int4_models["int4-weight-only"], load_profile("rpi4"))
    assert {o.reason for o in pi.unsupported} == {
        "tflite-runtime 2.14.0 has no int4-weight-only kernel for DEQUANTIZE of int4 weights (int4 input refused: "
        "dequantize.cc:58 accepts uint8/int8/int16/float16 only)"}
    host = check_model(int4_models["int4-weight-only"], load_profile("host-x86_64"))
    assert host.ok and any("slower than float on a CPU" in n for n in host.notes)


def _sqrt_model(tf) -> bytes:
    """Dense -> |.| + 0.1 -> SQRT -> Dense (an RMS-style front end, as PyPI akiki's voice detector has)."""
    import numpy as np

    rng = np.random.default_rng(0)
    w1 = tf.constant(rng.standard_normal((16, 16)).astype(np.float32))
    w2 = tf.constant(rng.standard_normal((16, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((1, 16), tf.float32)])
    def f(x):
        return tf.matmul(tf.sqrt(tf.abs(tf.matmul(x, w1)) + 0.1), w2)

    return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()


def test_kernels_the_runtime_cannot_run_at_the_written_version(tf, mlp, tmp_path):
    """The LiteRT quantizer keeps the float op's version: int8 SQRT v1, dynamic-range FULLY_CONNECTED
    v1. tflite-runtime 2.14 registers both versions, but its SQRT v1 refuses int8 at prepare and its
    FULLY_CONNECTED gives all zeros for per-channel hybrid weights (measured; the runtime table's
    [kernels]). `devices check` said OK and rpi4's files failed or computed nonsense on the Pi. Now
    the check refuses such a file, and the plan for rpi4 keeps those ops float, saying why."""
    import numpy as np

    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.errors import ProfileError
    from edgeq.plan import plan_precision
    from edgeq.precision import Scheme
    from edgeq.signature import ensure_signature
    from edgeq.tflite_model import read_model

    rpi4 = load_profile("rpi4")
    (tmp_path / "sqrt.tflite").write_bytes(ensure_signature(_sqrt_model(tf))[0])
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((60, 1, 16)).astype(np.float32))
    calib = CalibrationConfig(str(tmp_path / "x.npy"), samples=48, eval_samples=12)
    plain = convert(tmp_path / "sqrt.tflite", ConvertOptions(tmp_path / "plain.tflite", Scheme.INT8, calib=calib))
    assert any(o.name == "SQRT" and o.precision == "int8" for o in read_model(plain.output.read_bytes()).ops)
    report = check_model(plain.output, rpi4)
    assert not report.ok and [o.op for o in report.unsupported] == ["SQRT"]
    assert "tflite-runtime 2.14.0's SQRT kernel cannot run int8 (refused at prepare" in report.unsupported[0].reason

    pi = convert(tmp_path / "sqrt.tflite", ConvertOptions(tmp_path / "pi.tflite", calib=calib, device="rpi4"))
    sqrt = next(e for e in pi.manifest["plan"]["ops"] if e["op"] == "SQRT")
    assert sqrt["precision"] == "float" and "SQRT kernel cannot run int8" in sqrt["reason"], sqrt
    assert {o.precision for o in read_model(pi.output.read_bytes()).ops if o.name == "SQRT"} == {"float"}
    assert check_model(pi.output, rpi4).ok

    # hybrid FULLY_CONNECTED: planned float for rpi4 under --scheme dynamic, refused to the budget loop
    ops = read_model(_convert(tf, mlp, "float")).ops
    plan = plan_precision(ops, rpi4, scheme=Scheme.DYNAMIC)
    assert [e.precision for e in plan.entries] == ["float", "float"]
    assert "FULLY_CONNECTED kernel cannot run hybrid (per-channel dynamic-range weights" in plan.entries[0].reason
    with pytest.raises(ProfileError, match=r"rpi4 cannot run op 0 \(FULLY_CONNECTED\) as hybrid"):
        plan_precision(ops, rpi4, {0: ("hybrid", "accuracy budget")})
    assert plan_precision(ops, load_profile("rpi5"), scheme=Scheme.DYNAMIC).entries[0].precision == "hybrid"
