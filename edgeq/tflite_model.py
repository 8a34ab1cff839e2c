"""Read a .tflite flatbuffer: ops with their versions, tensors with dtypes and quantization.

Reads the file with the schema module LiteRT ships (flatbuffers + numpy only, no TensorFlow), so
`edgeq devices check` stays fast. This is how edgeq reads back what the converter really produced:
`TFLITE_BUILTINS_INT8` does not guarantee an all-int8 graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ModelFormatError
from .precision import BLOCKWISE_INT4, FLOAT_ACTIVATION_PRECISIONS, Precision

TFLITE_IDENTIFIER = b"TFL3"
# Boundary ops convert between precisions; they are not "an op that stayed float" (nor planned).
BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
# The SignatureDef key edgeq writes (signature.ensure_signature) and assumes for a key-less one.
SIGNATURE_KEY = "serving_default"
_FLOATS = {"float32", "float16", "float64", "bfloat16"}


@lru_cache(maxsize=1)
def _schema():
    from ai_edge_litert import schema_py_generated as schema
    return schema


@lru_cache(maxsize=1)
def _enum_names():
    s = _schema()
    ops = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    return ops, types


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str  # numpy-style name: float32, int8, int32, float16, ...
    shape: tuple[int, ...]
    is_constant: bool  # backed by a non-empty buffer (a weight or constant)
    quantized: bool  # carries quantization scale(s)
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    block_size: int = 0  # blockwise quantization (int4 weights): input values per scale; 0 = not blockwise

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.block_size:
            d["block_size"] = self.block_size
        if self.quantized:
            d["scale"] = self.scale[0] if len(self.scale) == 1 else list(self.scale)
            d["zero_point"] = self.zero_point[0] if len(self.zero_point) == 1 else list(self.zero_point)
        return d


@dataclass(frozen=True)
class OpInfo:
    index: int
    subgraph: int
    name: str  # builtin name, e.g. FULLY_CONNECTED; custom ops are "CUSTOM:<code>"
    version: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    # Weight-only quantization: the bits of a constant weight a DEQUANTIZE turns into one of this op's
    # float inputs (4 for int4-weight-only), 0 when there is none. Set by read_model, which sees the graph.
    dequantized_weight_bits: int = 0

    @property
    def int4_weight(self) -> TensorInfo | None:
        """The op's constant int4 weight (dynamic or static int4 recipes), or None."""
        return next((t for t in self.inputs if t.is_constant and t.dtype == "int4"), None)

    @property
    def weight_block_size(self) -> int:
        """Block size of the int4 weight's scales (0: per channel, or no int4 weight)."""
        w = self.int4_weight
        return w.block_size if w is not None else 0

    @property
    def is_custom(self) -> bool:
        return self.name.startswith("CUSTOM:")

    @property
    def has_weights(self) -> bool:
        """Has a constant weight that dynamic-range ("hybrid") quantization would store as int8."""
        from .tflite_ops import weight_tensor
        return weight_tensor(self) is not None

    @property
    def precision(self) -> Precision:
        """What the op computes: int8 | int16x8 | hybrid | float | other, judged from activation
        (non-constant) dtypes; the int4 precisions from an int4 weight (and its block size)."""
        if self.name in BOUNDARY_OPS:
            return Precision.OTHER
        # SHAPE, ARG_MAX, ...: outputs are indices or shapes, nothing to quantize.
        if self.outputs and all(t.dtype in ("int32", "int64", "bool") for t in self.outputs):
            return Precision.OTHER
        acts = [t.dtype for t in self.inputs if not t.is_constant] + [t.dtype for t in self.outputs]
        int4 = self.int4_weight
        if any(d in _FLOATS for d in acts):
            if int4 is not None:
                return BLOCKWISE_INT4.get(int4.block_size, Precision.INT4)
            if self.dequantized_weight_bits == 4:
                return Precision.INT4_WEIGHT_ONLY
            weights_int8 = any(t.is_constant and t.dtype == "int8" and len(t.shape) >= 1
                               for t in self.inputs)
            return Precision.HYBRID if weights_int8 else Precision.FLOAT
        if "int16" in acts:
            return Precision.INT16X8
        if "int8" in acts or "uint8" in acts:
            return Precision.INT4X8 if int4 is not None else Precision.INT8
        return Precision.OTHER

    def to_json(self) -> dict:
        return {"index": self.index, "subgraph": self.subgraph, "op": self.name, "version": self.version,
                "inputs": [t.dtype for t in self.inputs], "outputs": [t.dtype for t in self.outputs],
                "output": self.outputs[0].name if self.outputs else "", "precision": str(self.precision)}


@dataclass(frozen=True)
class ModelInfo:
    ops: tuple[OpInfo, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    signature_keys: tuple[str, ...]
    size_bytes: int

    @property
    def has_signature(self) -> bool:
        return bool(self.signature_keys)

    def op_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[str(op.precision)] = counts.get(str(op.precision), 0) + 1
        return counts

    def float_ops(self) -> list[OpInfo]:
        """Ops whose activations stayed float (hybrid, dynamic and weight-only int4 ops included)."""
        return [op for op in self.ops if op.precision in FLOAT_ACTIVATION_PRECISIONS]


def _as_bytes(model) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    path = Path(model)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read model ({e.strerror}); check the path") from None


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == TFLITE_IDENTIFIER


def read_model(model, *, name: str = "model") -> ModelInfo:
    """Parse a .tflite (path or bytes). Raises ModelFormatError for anything that is not one."""
    data = _as_bytes(model)
    if not isinstance(model, (bytes, bytearray, memoryview)):
        name = str(model)
    if not is_tflite(data):
        raise ModelFormatError(f"{name}: not a TFLite flatbuffer (missing 'TFL3' identifier); "
                               "pass a .tflite produced by the TFLite/LiteRT converter")
    s = _schema()
    op_names, type_names = _enum_names()
    try:
        m = s.Model.GetRootAs(data, 0)
        buffers_nonempty = []
        for i in range(m.BuffersLength()):
            b = m.Buffers(i)
            # Large models keep buffer data outside the flatbuffer (offset/size).
            buffers_nonempty.append(b.DataLength() > 0 or (b.Size() > 0 and b.Offset() > 1))
        codes = []
        for i in range(m.OperatorCodesLength()):
            c = m.OperatorCodes(i)
            code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
            opname = op_names.get(code, f"UNKNOWN_{code}")
            if opname == "CUSTOM":
                custom = c.CustomCode()
                opname = "CUSTOM:" + (custom.decode("utf-8", "replace") if custom else "?")
            codes.append((opname, max(c.Version(), 1)))
        ops: list[OpInfo] = []
        io_in: tuple[TensorInfo, ...] = ()
        io_out: tuple[TensorInfo, ...] = ()
        for sg_i in range(m.SubgraphsLength()):
            sg = m.Subgraphs(sg_i)
            tensors = [_tensor(sg.Tensors(t), t, buffers_nonempty, type_names)
                       for t in range(sg.TensorsLength())]

            def pick(idx):
                return tuple(tensors[j] for j in idx if 0 <= j < len(tensors))

            if sg_i == 0:
                io_in = pick(sg.InputsAsNumpy() if sg.InputsLength() else [])
                io_out = pick(sg.OutputsAsNumpy() if sg.OutputsLength() else [])
            raw = []
            for o in range(sg.OperatorsLength()):
                op = sg.Operators(o)
                opname, ver = codes[op.OpcodeIndex()]
                ins = pick(op.InputsAsNumpy()) if op.InputsLength() else ()
                outs = pick(op.OutputsAsNumpy()) if op.OutputsLength() else ()
                raw.append((o, opname, ver, ins, outs))
            # Weight-only quantization: DEQUANTIZE of a constant int4/int8 weight feeding a float kernel.
            dequantized = {outs[0].index: (4 if ins[0].dtype == "int4" else 8)
                           for _, opname, _, ins, outs in raw
                           if opname == "DEQUANTIZE" and ins and outs and ins[0].is_constant
                           and ins[0].dtype in ("int4", "int8")}
            for o, opname, ver, ins, outs in raw:
                bits = max((dequantized.get(t.index, 0) for t in ins), default=0)
                ops.append(OpInfo(o, sg_i, opname, ver, ins, outs, bits))
        sigs = []
        for i in range(m.SignatureDefsLength()):
            key = m.SignatureDefs(i).SignatureKey()
            sigs.append(key.decode() if key else SIGNATURE_KEY)
    except ModelFormatError:
        raise
    except Exception as e:  # flatbuffers raises assorted errors on truncated/corrupt data
        raise ModelFormatError(f"{name}: corrupt or truncated TFLite file ({type(e).__name__}: {e}); "
                               "re-export or re-copy the model") from None
    return ModelInfo(tuple(ops), io_in, io_out, tuple(sigs), len(data))


def _tensor(t, index, buffers_nonempty, type_names) -> TensorInfo:
    raw_name = t.Name()
    shape = tuple(int(x) for x in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    q = t.Quantization()
    scale: tuple[float, ...] = ()
    zp: tuple[int, ...] = ()
    if q is not None and q.ScaleLength():
        scale = tuple(float(x) for x in q.ScaleAsNumpy())
        zp = tuple(int(x) for x in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (0,) * len(scale)
    block = 0
    if q is not None and q.DetailsType() == _schema().QuantizationDetails.BlockwiseQuantization:
        details = _schema().BlockwiseQuantization()
        details.Init(q.Details().Bytes, q.Details().Pos)
        block = int(details.BlockSize())
    buf = t.Buffer()
    const = 0 < buf < len(buffers_nonempty) and buffers_nonempty[buf]
    return TensorInfo(index, raw_name.decode("utf-8", "replace") if raw_name else f"t{index}",
                      type_names.get(t.Type(), f"type{t.Type()}"), shape, const, bool(scale) or bool(block),
                      scale, zp, block)


def read_ops(model) -> list[OpInfo]:
    return list(read_model(model).ops)
