"""The manifest: built from a real conversion's parts, written, read back checked; bad files refused
in one line naming the file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgeq.calibration import CalibrationConfig, load_calibration
from edgeq.errors import EdgeqError
from edgeq.manifest import (SCHEMA, ManifestParts, build_manifest, manifest_path, read_manifest,
                            write_manifest)
from edgeq.plan import plan_precision
from edgeq.precision import IoType, Scheme
from edgeq.quantize import QuantizeRequest, quantize
from edgeq.sources import load_source
from edgeq.tflite_model import read_model
from edgeq.fidelity import fidelity


@pytest.fixture
def parts(tiny_dense, tmp_path):
    """A real int8 conversion of the tiny Dense model on random data, as convert hands it to the manifest."""
    source = load_source(tiny_dense)
    data = load_calibration(CalibrationConfig("random", samples=4, eval_samples=6), source.inputs)
    q = quantize(source, QuantizeRequest(Scheme.INT8), data.calibration)
    info = read_model(q)
    plan = plan_precision(list(read_model(source.float_tflite).ops), None, scheme=Scheme.INT8)
    out = tmp_path / "m.tflite"
    out.write_bytes(q)
    fid = fidelity(source.float_tflite, q, list(data.evaluation()))
    return ManifestParts(tiny_dense, out, q, source, Scheme.INT8, IoType.FLOAT32, None, data, False, "minmax",
                         plan, info, fid, None, None, ("a warning",))


def test_written_manifest_reads_back_equal(parts, tmp_path):
    m = build_manifest(parts)
    q = parts.model_bytes
    assert m["schema"] == SCHEMA and m["scheme"] == "int8" and m["device"] is None
    assert m["calibrated"] is False  # int8 on random data
    assert m["output"] == {"path": "m.tflite", "sha256": hashlib.sha256(q).hexdigest(), "bytes": len(q)}
    assert m["source"]["sha256"] == hashlib.sha256(parts.model.read_bytes()).hexdigest()
    float_bytes = len(parts.source.float_tflite)
    assert m["sizes"] == {"float_bytes": float_bytes, "quantized_bytes": len(q), "ratio": float_bytes / len(q)}
    assert m["calibration"] == {"kind": "none", "calibrated": False, "eval_kind": "random", "range_method": "minmax"}
    assert m["fidelity"]["inputs"] == "random" and m["fidelity"]["samples"] == 6
    assert "per_layer" not in m["fidelity"]  # no writer produces per-layer rows
    assert m["plan"]["device"] is None and m["plan"]["scheme"] == "int8"
    assert m["op_summary"] == read_model(q).op_summary() and m["warnings"] == ["a warning"]
    path = manifest_path(parts.output)
    assert path.name == "m.edgeq.json"
    write_manifest(path, m)
    back = read_manifest(path)
    assert back == json.loads(json.dumps(m)) and back["ops"] == [op.to_json() for op in read_model(q).ops]


def test_readers_treat_sections_as_optional(tmp_path):
    (tmp_path / "min.edgeq.json").write_text(json.dumps({"schema": SCHEMA, "fidelity": None}))
    assert read_manifest(tmp_path / "min.edgeq.json") == {"schema": SCHEMA, "fidelity": None}


@pytest.mark.parametrize("content,message", [
    ('{"schema": "edgeq.bench/1"}', "not an edgeq manifest (schema 'edgeq.bench/1', want edgeq.manifest/1)"),
    ("[1, 2]", "not an edgeq manifest (schema None, want edgeq.manifest/1)"),
    ("{not json", "cannot read manifest (Expecting property name"),
    (json.dumps({"schema": SCHEMA, "output": "m.tflite"}), "bad manifest: output is a string, want an object"),
    (json.dumps({"schema": SCHEMA, "ops": {}}), "bad manifest: ops is an object, want a list"),
    (json.dumps({"schema": SCHEMA, "plan": []}), "bad manifest: plan is a list, want an object or null"),
    (json.dumps({"schema": SCHEMA, "optimize": "fast"}), "bad manifest: optimize is a string, want an object or null"),
    (json.dumps({"schema": SCHEMA, "size_goal": 12}), "bad manifest: size_goal is int, want an object or null"),
])
def test_bad_manifest_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "x.edgeq.json"
    path.write_text(content)
    with pytest.raises(EdgeqError) as e:
        read_manifest(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_missing_manifest_and_bad_writes(parts, tmp_path):
    with pytest.raises(EdgeqError, match=r"missing.edgeq.json: cannot read manifest .*; re-run edgeq convert"):
        read_manifest(tmp_path / "missing.edgeq.json")
    m = build_manifest(parts)
    with pytest.raises(EdgeqError, match="bad manifest: sizes is a list"):
        write_manifest(tmp_path / "bad.edgeq.json", {**m, "sizes": [1]})
    assert not (tmp_path / "bad.edgeq.json").exists()  # nothing half-written


def test_manifest_holds_numpy_free_json(parts):
    """Every value is plain JSON (no numpy scalars, enums survive as their strings)."""
    m = build_manifest(parts)
    assert json.loads(json.dumps(m)) == m
    assert not any(isinstance(v, np.generic) for v in _leaves(m))


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj
