"""TFLite builtin op names and the few facts about ops that planning needs.

BUILTIN_OPS is the schema's BuiltinOperator enum in code order (BUILTIN_OPS[code] is the name),
generated from ai_edge_litert 2.3.0 `schema_py_generated.py`. It is a static tuple on purpose:
importing that module loads libLiteRt.so and numpy (~150 ms), and profile validation must stay
instant (`edgeq devices list`). tests/test_profiles.py checks the tuple against the schema.
"""

from __future__ import annotations

import difflib

BUILTIN_OPS: tuple[str, ...] = (
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE",
    "DEQUANTIZE", "EMBEDDING_LOOKUP", "FLOOR", "FULLY_CONNECTED", "HASHTABLE_LOOKUP",
    "L2_NORMALIZATION", "L2_POOL_2D", "LOCAL_RESPONSE_NORMALIZATION", "LOGISTIC", "LSH_PROJECTION",
    "LSTM", "MAX_POOL_2D", "MUL", "RELU", "RELU_N1_TO_1", "RELU6", "RESHAPE", "RESIZE_BILINEAR",
    "RNN", "SOFTMAX", "SPACE_TO_DEPTH", "SVDF", "TANH", "CONCAT_EMBEDDINGS", "SKIP_GRAM", "CALL",
    "CUSTOM", "EMBEDDING_LOOKUP_SPARSE", "PAD", "UNIDIRECTIONAL_SEQUENCE_RNN", "GATHER",
    "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "TRANSPOSE", "MEAN", "SUB", "DIV", "SQUEEZE",
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "STRIDED_SLICE", "BIDIRECTIONAL_SEQUENCE_RNN", "EXP", "TOPK_V2",
    "SPLIT", "LOG_SOFTMAX", "DELEGATE", "BIDIRECTIONAL_SEQUENCE_LSTM", "CAST", "PRELU", "MAXIMUM",
    "ARG_MAX", "MINIMUM", "LESS", "NEG", "PADV2", "GREATER", "GREATER_EQUAL", "LESS_EQUAL",
    "SELECT", "SLICE", "SIN", "TRANSPOSE_CONV", "SPARSE_TO_DENSE", "TILE", "EXPAND_DIMS", "EQUAL",
    "NOT_EQUAL", "LOG", "SUM", "SQRT", "RSQRT", "SHAPE", "POW", "ARG_MIN", "FAKE_QUANT",
    "REDUCE_PROD", "REDUCE_MAX", "PACK", "LOGICAL_OR", "ONE_HOT", "LOGICAL_AND", "LOGICAL_NOT",
    "UNPACK", "REDUCE_MIN", "FLOOR_DIV", "REDUCE_ANY", "SQUARE", "ZEROS_LIKE", "FILL", "FLOOR_MOD",
    "RANGE", "RESIZE_NEAREST_NEIGHBOR", "LEAKY_RELU", "SQUARED_DIFFERENCE", "MIRROR_PAD", "ABS",
    "SPLIT_V", "UNIQUE", "CEIL", "REVERSE_V2", "ADD_N", "GATHER_ND", "COS", "WHERE", "RANK", "ELU",
    "REVERSE_SEQUENCE", "MATRIX_DIAG", "QUANTIZE", "MATRIX_SET_DIAG", "ROUND", "HARD_SWISH", "IF",
    "WHILE", "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5", "SCATTER_ND", "SELECT_V2",
    "DENSIFY", "SEGMENT_SUM", "BATCH_MATMUL", "PLACEHOLDER_FOR_GREATER_OP_CODES", "CUMSUM",
    "CALL_ONCE", "BROADCAST_TO", "RFFT2D", "CONV_3D", "IMAG", "REAL", "COMPLEX_ABS", "HASHTABLE",
    "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE", "REDUCE_ALL", "CONV_3D_TRANSPOSE",
    "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "BROADCAST_ARGS", "RANDOM_STANDARD_NORMAL",
    "BUCKETIZE", "RANDOM_UNIFORM", "MULTINOMIAL", "GELU", "DYNAMIC_UPDATE_SLICE", "RELU_0_TO_1",
    "UNSORTED_SEGMENT_PROD", "UNSORTED_SEGMENT_MAX", "UNSORTED_SEGMENT_SUM", "ATAN2",
    "UNSORTED_SEGMENT_MIN", "SIGN", "BITCAST", "BITWISE_XOR", "RIGHT_SHIFT", "STABLEHLO_LOGISTIC",
    "STABLEHLO_ADD", "STABLEHLO_DIVIDE", "STABLEHLO_MULTIPLY", "STABLEHLO_MAXIMUM",
    "STABLEHLO_RESHAPE", "STABLEHLO_CLAMP", "STABLEHLO_CONCATENATE", "STABLEHLO_BROADCAST_IN_DIM",
    "STABLEHLO_CONVOLUTION", "STABLEHLO_SLICE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_REDUCE",
    "STABLEHLO_ABS", "STABLEHLO_AND", "STABLEHLO_COSINE", "STABLEHLO_EXPONENTIAL",
    "STABLEHLO_FLOOR", "STABLEHLO_LOG", "STABLEHLO_MINIMUM", "STABLEHLO_NEGATE", "STABLEHLO_OR",
    "STABLEHLO_POWER", "STABLEHLO_REMAINDER", "STABLEHLO_RSQRT", "STABLEHLO_SELECT",
    "STABLEHLO_SUBTRACT", "STABLEHLO_TANH", "STABLEHLO_SCATTER", "STABLEHLO_COMPARE",
    "STABLEHLO_CONVERT", "STABLEHLO_DYNAMIC_SLICE", "STABLEHLO_DYNAMIC_UPDATE_SLICE",
    "STABLEHLO_PAD", "STABLEHLO_IOTA", "STABLEHLO_DOT_GENERAL", "STABLEHLO_REDUCE_WINDOW",
    "STABLEHLO_SORT", "STABLEHLO_WHILE", "STABLEHLO_GATHER", "STABLEHLO_TRANSPOSE", "DILATE",
    "STABLEHLO_RNG_BIT_GENERATOR", "REDUCE_WINDOW", "STABLEHLO_COMPOSITE", "STABLEHLO_SHIFT_LEFT",
    "STABLEHLO_CBRT", "STABLEHLO_CASE",
)
BUILTIN_OP_SET = frozenset(BUILTIN_OPS)

# Ops whose constant operand dynamic-range ("hybrid") quantization stores as int8, and which
# operand that is (None: any constant matrix, e.g. the many gate weights of LSTM/RNN/SVDF).
# Source: tensorflow/lite/tools/optimize/quantize_weights.cc (quantizable ops) and the hybrid
# kernels in tensorflow/lite/kernels/ (fully_connected.cc, conv.cc, batch_matmul.cc, ...).
WEIGHT_OPERAND: dict[str, int | None] = {
    "FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
    "CONV_3D": 1, "CONV_3D_TRANSPOSE": 1, "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1, "GATHER": 0,
    "LSTM": None, "UNIDIRECTIONAL_SEQUENCE_LSTM": None, "BIDIRECTIONAL_SEQUENCE_LSTM": None,
    "RNN": None, "UNIDIRECTIONAL_SEQUENCE_RNN": None, "BIDIRECTIONAL_SEQUENCE_RNN": None,
    "SVDF": None,
}

# The converter leaves smaller weight tensors float in dynamic-range mode
# (kWeightsMinNumElementsDefault in tensorflow/lite/tools/optimize/quantize_weights.h; measured:
# a 4x64 Dense kernel stays float32 under Optimize.DEFAULT in TF 2.21 while a 64x64 one is int8).
MIN_WEIGHT_ELEMENTS = 1024

# int4 plans keep smaller weights at 8 bits: int4 would save under 512 bytes there, and a small table
# is where 4 bits hurt most. Measured on all-MiniLM-L6-v2: its token-type table (2x384, one row added
# to every token, an error LayerNorm cannot remove) at int4 costs cosine 0.020 by itself, the
# 30522x384 word table at int4 0.006.
INT4_MIN_WEIGHT_ELEMENTS = 1024

_FLOAT_DTYPES = frozenset({"float32", "float16", "float64", "bfloat16"})


def is_builtin(name: str) -> bool:
    return name in BUILTIN_OP_SET


def suggest(name: str) -> str | None:
    """Closest builtin op name to a typo (FULLY_CONECTED -> FULLY_CONNECTED), or None."""
    hits = difflib.get_close_matches(name.upper(), BUILTIN_OPS, n=1, cutoff=0.75)
    return hits[0] if hits else None


def weight_tensor(op):
    """The constant float weight tensor dynamic-range quantization would make int8, or None.

    `op` is an edgeq.tflite_model.OpInfo read from the float model.
    """
    if op.name not in WEIGHT_OPERAND:
        return None
    where = WEIGHT_OPERAND[op.name]
    candidates = op.inputs if where is None else op.inputs[where:where + 1]
    for t in candidates:
        if t.is_constant and t.dtype in _FLOAT_DTYPES and len(t.shape) >= 2:
            return t
    return None


def has_float_tensors(op) -> bool:
    """True when any activation (non-constant input or output) is float: there is something to quantize."""
    return any(t.dtype in _FLOAT_DTYPES for t in op.outputs) or any(
        t.dtype in _FLOAT_DTYPES for t in op.inputs if not t.is_constant)

# Ops the LiteRT quantizer (litert-quantizer 0.11, default_policy.py DEFAULT_JSON_POLICY) writes with
# int4 weights, per kind of int4 recipe. It silently leaves any other op float under an int4 recipe
# (measured: DEPTHWISE_CONV_2D, GATHER, and blockwise CONV_2D stay float32), so the plan gives those
# ops the 8-bit fallback instead (precision.INT4_FALLBACK).
QUANTIZER_INT4_OPS: dict[str, frozenset[str]] = {
    "dynamic": frozenset({"FULLY_CONNECTED", "EMBEDDING_LOOKUP", "CONV_2D"}),  # dynamic_wi4_afp32
    "blockwise": frozenset({"FULLY_CONNECTED", "EMBEDDING_LOOKUP"}),  # dynamic_wi4_afp32_blockwise
    "static": frozenset({"FULLY_CONNECTED", "CONV_2D"}),  # static_wi4_ai8
    "weight_only": frozenset({"FULLY_CONNECTED", "EMBEDDING_LOOKUP", "CONV_2D", "BATCH_MATMUL"}),  # weightonly_wi4_afp32
}


def quantizer_int4_ops(precision: str) -> frozenset[str]:
    """Ops the LiteRT quantizer writes at an int4 precision value ("int4", "int4-b32", "int4x8", ...);
    empty for any other precision."""
    if not precision.startswith("int4"):
        return frozenset()
    if precision == "int4x8":
        return QUANTIZER_INT4_OPS["static"]
    if precision == "int4-weight-only":
        return QUANTIZER_INT4_OPS["weight_only"]
    return QUANTIZER_INT4_OPS["blockwise" if precision.startswith("int4-b") else "dynamic"]
