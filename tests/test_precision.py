"""The precision vocabulary: the tables between Precision, Scheme, recipe precision and IoType."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeq.errors import QuantizationError
from edgeq.litert_quant import op_config
from edgeq.precision import (BLOCKWISE_INT4, FLOAT_ACTIVATION_PRECISIONS, INT4_BLOCK_SIZE, INT4_FALLBACK,
                             INT4_PRECISIONS, POLICY_PRECISIONS, PRECISION_SCHEME, PROFILE_IO_TYPES,
                             RECIPE_PRECISION, RECIPE_PRECISIONS, SCHEME_IO, SCHEME_PRECISION, WEIGHT_BITS, IoType,
                             Precision, Scheme, check_io, scheme_for, slower_than_float_on_cpu)


def test_scheme_and_precision_round_trip():
    for scheme in Scheme:
        assert scheme_for(scheme.precision) is scheme
        assert PRECISION_SCHEME[SCHEME_PRECISION[scheme]] is scheme
    assert set(SCHEME_PRECISION) == set(Scheme) and set(SCHEME_IO) == set(Scheme)
    assert scheme_for(Precision.FLOAT) is None and scheme_for(Precision.OTHER) is None
    assert Scheme.DYNAMIC.precision is Precision.HYBRID and Scheme.FP16.precision is Precision.FP16


def test_what_the_file_computes_for_each_precision():
    # fp16 computes in float; "other" is never planned, so it has no recipe line.
    assert {s: s.op_precision for s in Scheme} == {Scheme.INT8: "int8", Scheme.INT16X8: "int16x8",
                                                     Scheme.DYNAMIC: "hybrid", Scheme.FP16: "float",
                                                     **{s: s.value for s in Scheme if s.is_int4}}
    assert set(RECIPE_PRECISION) == set(POLICY_PRECISIONS) and Precision.OTHER not in RECIPE_PRECISION
    assert RECIPE_PRECISIONS == {Precision.INT8, Precision.INT16X8, Precision.HYBRID, Precision.FLOAT} | INT4_PRECISIONS
    assert all(RECIPE_PRECISION[p] is p for p in RECIPE_PRECISIONS)  # a recipe precision maps to itself
    # Every recipe precision is a line the LiteRT quantizer takes; the others are refused by name.
    assert {p: op_config(p)[0] for p in RECIPE_PRECISIONS} == {
        **{p: "min_max_uniform_quantize" for p in RECIPE_PRECISIONS}, Precision.FLOAT: "no_quantize"}
    assert op_config(Precision.INT16X8)[1]["activation_tensor_config"]["num_bits"] == 16
    assert op_config("int8", "BATCH_MATMUL")[1]["activation_tensor_config"]["symmetric"] is True
    for p in (Precision.FP16, Precision.OTHER):
        with pytest.raises(QuantizationError, match=f"precision '{p}' is not one of int8, int16x8, hybrid, float, int4"):
            op_config(p)


def test_int4_tables():
    assert INT4_PRECISIONS == set(INT4_FALLBACK) == set(INT4_BLOCK_SIZE) and INT4_PRECISIONS <= set(POLICY_PRECISIONS)
    assert {p for p in INT4_PRECISIONS if INT4_BLOCK_SIZE[p]} == {
        Precision.INT4_B32, Precision.INT4_B64, Precision.INT4_B128, Precision.INT4_B256}
    assert dict(BLOCKWISE_INT4) == {32: Precision.INT4_B32, 64: Precision.INT4_B64, 128: Precision.INT4_B128,
                                    256: Precision.INT4_B256}
    # The fallback keeps the kind of compute: dynamic -> dynamic int8, static -> int8, weight-only -> float.
    assert INT4_FALLBACK[Precision.INT4_B64] is Precision.HYBRID and INT4_FALLBACK[Precision.INT4X8] is Precision.INT8
    assert INT4_FALLBACK[Precision.INT4_WEIGHT_ONLY] is Precision.FLOAT
    assert all(WEIGHT_BITS[p] == 4 for p in INT4_PRECISIONS) and WEIGHT_BITS[Precision.HYBRID] == 8
    assert Precision.INT4X8 not in FLOAT_ACTIVATION_PRECISIONS and Precision.INT4_B32 in FLOAT_ACTIVATION_PRECISIONS
    # Only weight-only int4 is slower than float on a CPU, and it says so.
    slow = {p for p in Precision if slower_than_float_on_cpu(p)}
    assert slow == {Precision.INT4_WEIGHT_ONLY} and "slower than float" in slower_than_float_on_cpu(Precision.INT4_WEIGHT_ONLY)
    # Every int4 precision but weight-only (slower than float on a CPU) is a scheme of its own;
    # only int4x8 has static activations (calibration, integer I/O).
    assert {p for p in INT4_PRECISIONS if scheme_for(p) is None} == {Precision.INT4_WEIGHT_ONLY}
    assert {s for s in Scheme if s.is_int4} == {scheme_for(p) for p in INT4_PRECISIONS} - {None}
    assert [s for s in Scheme if s.is_int4 and s.needs_calibration] == [Scheme.INT4X8]
    assert SCHEME_IO[Scheme.INT4X8] == (IoType.FLOAT32, IoType.INT8) and SCHEME_IO[Scheme.INT4_B32] == (IoType.FLOAT32,)


@pytest.mark.parametrize("scheme,ok,wrong,refused", [
    (Scheme.INT8, {IoType.FLOAT32, IoType.INT8, IoType.UINT8}, IoType.INT16,
     "--io int16 does not go with --scheme int8; use one of float32, int8, uint8"),
    (Scheme.INT16X8, {IoType.FLOAT32, IoType.INT16}, IoType.INT8,
     "--io int8 does not go with --scheme int16x8; use one of float32, int16"),
    (Scheme.DYNAMIC, {IoType.FLOAT32}, IoType.INT8, "--io int8 does not go with --scheme dynamic; use one of float32"),
    (Scheme.FP16, {IoType.FLOAT32}, IoType.UINT8, "--io uint8 does not go with --scheme fp16; use one of float32"),
])
def test_check_io(scheme, ok, wrong, refused):
    for io in ok:
        check_io(scheme, io)
    for io in set(IoType) - ok:
        with pytest.raises(QuantizationError, match="does not go with"):
            check_io(scheme, io)
    with pytest.raises(QuantizationError) as e:
        check_io(scheme, wrong)
    assert str(e.value) == refused


def test_profiles_name_a_subset_of_the_io_types():
    assert set(PROFILE_IO_TYPES) < set(IoType) and IoType.INT16 not in PROFILE_IO_TYPES
    # Each I/O dtype a profile names is one some scheme produces.
    assert all(any(io in SCHEME_IO[s] for s in Scheme) for io in PROFILE_IO_TYPES)


def test_cli_choices_are_the_enums():
    from edgeq.cli import main
    params = {p.name: p for p in main.commands["convert"].params}
    assert list(params["scheme"].type.choices) == [s.value for s in Scheme]
    assert list(params["io_type"].type.choices) == [t.value for t in IoType]


def test_import_is_stdlib_only():
    code = ("import sys, edgeq.precision; bad = [m for m in ('numpy', 'tensorflow', 'ai_edge_litert') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
