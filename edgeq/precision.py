"""The precision vocabulary: what an op computes, what a conversion applies, what a model's I/O is,
and the tables between them. Every other module takes these enums from here; a new precision (int4
weights, issue 16) is added to the enums and the tables below, nowhere else. Which ops the LiteRT
quantizer writes at int4 is in tflite_ops.QUANTIZER_INT4_OPS; which ops a runtime runs at int4 is in
its devices/runtimes/*.toml [int4] table.

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
    # int4 weights (issue 16). Dynamic range: int4 weights, activations quantized at run time per
    # batch row (as HYBRID), one scale per output channel or per block of input values.
    INT4 = "int4"
    INT4_B32 = "int4-b32"
    INT4_B64 = "int4-b64"
    INT4_B128 = "int4-b128"
    INT4_B256 = "int4-b256"
    INT4X8 = "int4x8"  # static: int4 weights, int8 activations (calibrated ranges)
    # int4 weights dequantized to float when the model loads, float compute: small file, but slower
    # than float on CPU (measured 0.22x on a 384->1536 MLP, issue 16). Never chosen without a warning.
    INT4_WEIGHT_ONLY = "int4-weight-only"
    OTHER = "other"  # plans and files only: an op with no float tensors, nothing to quantize


# What a profile may name (scheme, [ops] policy, accelerator precisions); OTHER is decided, not asked for.
POLICY_PRECISIONS = (Precision.INT8, Precision.INT16X8, Precision.HYBRID, Precision.FLOAT, Precision.FP16,
                     Precision.INT4, Precision.INT4_B32, Precision.INT4_B64, Precision.INT4_B128,
                     Precision.INT4_B256, Precision.INT4X8, Precision.INT4_WEIGHT_ONLY)


class Scheme(StrEnum):
    INT8 = "int8"  # full integer, per-channel weights
    INT16X8 = "int16x8"  # int16 activations, int8 weights
    DYNAMIC = "dynamic"  # dynamic-range ("hybrid"): int8 weights, float activations
    FP16 = "fp16"
    # int4 weights (LiteRT quantizer only): dynamic, channelwise or per block of input values, and
    # static int4x8 (int8 activations). Ops without an int4 kernel take INT4_FALLBACK.
    INT4 = "int4"
    INT4_B32 = "int4-b32"
    INT4_B64 = "int4-b64"
    INT4_B128 = "int4-b128"
    INT4_B256 = "int4-b256"
    INT4X8 = "int4x8"

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges: the scheme needs representative samples."""
        return self in (Scheme.INT8, Scheme.INT16X8, Scheme.INT4X8)

    @property
    def is_int4(self) -> bool:
        """int4 weights: only the LiteRT quantizer writes them (the TFLite converter cannot)."""
        return self.precision in INT4_PRECISIONS

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
    Scheme.FP16: Precision.FP16, Scheme.INT4: Precision.INT4, Scheme.INT4_B32: Precision.INT4_B32,
    Scheme.INT4_B64: Precision.INT4_B64, Scheme.INT4_B128: Precision.INT4_B128,
    Scheme.INT4_B256: Precision.INT4_B256, Scheme.INT4X8: Precision.INT4X8})
PRECISION_SCHEME: Mapping[Precision, Scheme] = MappingProxyType({p: s for s, p in SCHEME_PRECISION.items()})

# Planned precision -> what the LiteRT quantizer's recipe makes of it, i.e. what the produced file
# computes (fp16 computes in float; OTHER ops are left to the quantizer, so they have no entry).
RECIPE_PRECISION: Mapping[Precision, Precision] = MappingProxyType({
    Precision.INT8: Precision.INT8, Precision.INT16X8: Precision.INT16X8, Precision.HYBRID: Precision.HYBRID,
    Precision.FLOAT: Precision.FLOAT, Precision.FP16: Precision.FLOAT,
    **{p: p for p in (Precision.INT4, Precision.INT4_B32, Precision.INT4_B64, Precision.INT4_B128,
                      Precision.INT4_B256, Precision.INT4X8, Precision.INT4_WEIGHT_ONLY)}})
RECIPE_PRECISIONS = frozenset(RECIPE_PRECISION.values())

# Scheme -> the I/O dtypes it can produce (first: the default). Integer I/O needs static ranges.
SCHEME_IO: Mapping[Scheme, tuple[IoType, ...]] = MappingProxyType({
    Scheme.INT8: (IoType.FLOAT32, IoType.INT8, IoType.UINT8), Scheme.INT16X8: (IoType.FLOAT32, IoType.INT16),
    Scheme.DYNAMIC: (IoType.FLOAT32,), Scheme.FP16: (IoType.FLOAT32,),
    **{s: (IoType.FLOAT32,) for s in (Scheme.INT4, Scheme.INT4_B32, Scheme.INT4_B64, Scheme.INT4_B128,
                                      Scheme.INT4_B256)},
    Scheme.INT4X8: (IoType.FLOAT32, IoType.INT8)})


# int4 precision -> block size of its weight scales (0: one scale per output channel). The LiteRT
# quantizer's QuantGranularity has BLOCKWISE_32/64/128/256; a blockwise weight's file tensor carries
# BlockwiseQuantization.blockSize, which is how tflite_model reads it back.
INT4_BLOCK_SIZE: Mapping[Precision, int] = MappingProxyType({
    Precision.INT4: 0, Precision.INT4_B32: 32, Precision.INT4_B64: 64, Precision.INT4_B128: 128,
    Precision.INT4_B256: 256, Precision.INT4X8: 0, Precision.INT4_WEIGHT_ONLY: 0})
INT4_PRECISIONS = frozenset(INT4_BLOCK_SIZE)
BLOCKWISE_INT4: Mapping[int, Precision] = MappingProxyType({b: p for p, b in INT4_BLOCK_SIZE.items()
                                                            if b and p is not Precision.INT4X8})

# What an op gets when it has no int4 kernel (in the quantizer or in the target runtime): the same
# kind of compute at 8 bits. Dynamic int4 -> dynamic int8; static int4x8 -> int8; weight-only -> float
# (there is no weight-only int8 precision: hybrid would change how it computes, float does not).
INT4_FALLBACK: Mapping[Precision, Precision] = MappingProxyType({
    **{p: Precision.HYBRID for p in (Precision.INT4, Precision.INT4_B32, Precision.INT4_B64,
                                     Precision.INT4_B128, Precision.INT4_B256)},
    Precision.INT4X8: Precision.INT8, Precision.INT4_WEIGHT_ONLY: Precision.FLOAT})

# Precisions whose activations are float in the file (what convert reports as "stayed float").
FLOAT_ACTIVATION_PRECISIONS = frozenset({Precision.FLOAT, Precision.HYBRID, Precision.INT4, Precision.INT4_B32,
                                         Precision.INT4_B64, Precision.INT4_B128, Precision.INT4_B256,
                                         Precision.INT4_WEIGHT_ONLY})

# Weight bits a precision stores (None: float weights); size estimates and reports use it.
WEIGHT_BITS: Mapping[Precision, int | None] = MappingProxyType({
    Precision.INT8: 8, Precision.INT16X8: 8, Precision.HYBRID: 8, Precision.FLOAT: None, Precision.FP16: 16,
    **{p: 4 for p in INT4_PRECISIONS}, Precision.OTHER: None})


def slower_than_float_on_cpu(precision: Precision) -> str | None:
    """The warning a CPU placement of `precision` needs (None: no warning). Weight-only int4
    dequantizes to float and computes in float: measured 0.22x float speed in LiteRT 2.3 (issue 16)."""
    if precision is Precision.INT4_WEIGHT_ONLY:
        return ("int4-weight-only computes in float after dequantizing its weights: slower than float on a CPU "
                "(0.22x measured, LiteRT 2.3); use int4 (dynamic) for speed")
    return None


def scheme_for(precision: Precision) -> Scheme | None:
    """The scheme that plans `precision` for every op (None: not a scheme, e.g. float)."""
    return PRECISION_SCHEME.get(precision)


def check_io(scheme: Scheme, io: IoType) -> None:
    """QuantizationError naming the I/O dtypes `scheme` can produce, unless `io` is one of them."""
    allowed = SCHEME_IO[scheme]
    if io not in allowed:
        raise QuantizationError(f"--io {io.value} does not go with --scheme {scheme.value}; "
                                f"use one of {', '.join(a.value for a in allowed)}")
