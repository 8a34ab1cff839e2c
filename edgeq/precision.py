"""The precision vocabulary: what an op computes, what a conversion applies, what a model's I/O is,
and the tables between them. Every other module takes these enums from here; a new precision (int4
weights, issue 16) is added to the enums and the tables below, nowhere else.

- `Precision`: per-op precision in device profiles, plans, recipes and read back from a .tflite.
- `Scheme`: the whole-model scheme of `edgeq convert --scheme`.
- `IoType`: the dtype of the model's inputs/outputs (`--io`; profiles name a subset).

Stdlib only: profile validation and `edgeq --help` import it.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import Mapping

from .errors import QuantizationError


class Precision(StrEnum):
    INT8 = "int8"  # int8 weights and activations
    INT16X8 = "int16x8"  # int16 activations, int8 weights
    HYBRID = "hybrid"  # dynamic range: int8 weights, float activations
    FLOAT = "float"  # float32
    FP16 = "fp16"  # float16 weights (GPU-style); computes in float
    OTHER = "other"  # plans and files only: an op with no float tensors, nothing to quantize


# What a profile may name (scheme, [ops] policy, accelerator precisions); OTHER is decided, not asked for.
POLICY_PRECISIONS = (Precision.INT8, Precision.INT16X8, Precision.HYBRID, Precision.FLOAT, Precision.FP16)


class Scheme(StrEnum):
    INT8 = "int8"  # full integer, per-channel weights
    INT16X8 = "int16x8"  # int16 activations, int8 weights
    DYNAMIC = "dynamic"  # dynamic-range ("hybrid"): int8 weights, float activations
    FP16 = "fp16"

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges: the scheme needs representative samples."""
        return self in (Scheme.INT8, Scheme.INT16X8)

    @property
    def precision(self) -> Precision:
        """The per-op precision this scheme plans for every op."""
        return SCHEME_PRECISION[self]

    @property
    def op_precision(self) -> Precision:
        """What the scheme's ops compute in the produced file (the LiteRT quantizer's recipe precision)."""
        return RECIPE_PRECISION[self.precision]


class IoType(StrEnum):
    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"


# The I/O dtypes a device profile may name (io.input / io.output).
PROFILE_IO_TYPES = (IoType.INT8, IoType.UINT8, IoType.FLOAT32)

# ---------------------------------------------------------------------------------------------
# The tables: the one place a precision is tied to a scheme, a recipe and an I/O dtype.

# Scheme -> the precision it plans per op; inverted, a profile's `scheme = "..."` -> the Scheme.
SCHEME_PRECISION: Mapping[Scheme, Precision] = MappingProxyType({
    Scheme.INT8: Precision.INT8, Scheme.INT16X8: Precision.INT16X8, Scheme.DYNAMIC: Precision.HYBRID,
    Scheme.FP16: Precision.FP16})
PRECISION_SCHEME: Mapping[Precision, Scheme] = MappingProxyType({p: s for s, p in SCHEME_PRECISION.items()})

# Planned precision -> what the LiteRT quantizer's recipe makes of it, i.e. what the produced file
# computes (fp16 computes in float; OTHER ops are left to the quantizer, so they have no entry).
RECIPE_PRECISION: Mapping[Precision, Precision] = MappingProxyType({
    Precision.INT8: Precision.INT8, Precision.INT16X8: Precision.INT16X8, Precision.HYBRID: Precision.HYBRID,
    Precision.FLOAT: Precision.FLOAT, Precision.FP16: Precision.FLOAT})
RECIPE_PRECISIONS = frozenset(RECIPE_PRECISION.values())

# Scheme -> the I/O dtypes it can produce (first: the default). Integer I/O needs static ranges.
SCHEME_IO: Mapping[Scheme, tuple[IoType, ...]] = MappingProxyType({
    Scheme.INT8: (IoType.FLOAT32, IoType.INT8, IoType.UINT8), Scheme.INT16X8: (IoType.FLOAT32, IoType.INT16),
    Scheme.DYNAMIC: (IoType.FLOAT32,), Scheme.FP16: (IoType.FLOAT32,)})


def scheme_for(precision: Precision) -> Scheme | None:
    """The scheme that plans `precision` for every op (None: not a scheme, e.g. float)."""
    return PRECISION_SCHEME.get(precision)


def check_io(scheme: Scheme, io: IoType) -> None:
    """QuantizationError naming the I/O dtypes `scheme` can produce, unless `io` is one of them."""
    allowed = SCHEME_IO[scheme]
    if io not in allowed:
        raise QuantizationError(f"--io {io.value} does not go with --scheme {scheme.value}; "
                                f"use one of {', '.join(a.value for a in allowed)}")
