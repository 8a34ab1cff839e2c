"""Graph rewrites that turn a published float .tflite into the plain float graph quantizers expect.

Published files are float, but not always plain float32 graphs:
- weights stored as float16 (or int8) constants behind `DEQUANTIZE` ops (the usual fp16 export);
- sparse weights behind `DENSIFY` ops (TFLite's sparsity format, often followed by a DEQUANTIZE);
- old files whose operator codes fill only `deprecated_builtin_code`: the LiteRT quantizer reads
  `builtin_code` alone and sees every op as ADD (0), so conv filters get activation parameters and
  the result fails to prepare ("zero_point->data[i] != 0");
- standalone RELU/RELU6/RELU_N1_TO_1 after an op that can fuse them (old converters left them):
  XNNPACK has no int8 kernel for a standalone RELU, so each one cut the delegated graph
  (face_detection_short_range: 18 partitions, 17 RELUs on the builtin kernels);
- standalone RELUs whose input other ops read too (NASNet, Xception) and HARD_SWISH (MobileNetV3):
  XNNPACK has no int8 kernel for either, so int8 graphs ran them on the builtin kernels between
  delegated partitions; written as MUL by 1 with the RELU fused, and as ADD(+RELU6)/MUL/MUL;
- PRELU (MediaPipe's face mesh, iris and hand models): the LiteRT quantizer has no int8 PRELU, and
  XNNPACK no int8 PRELU kernel, so each one stays float between int8 convolutions: off an int8
  accelerator (Edge TPU: the compiler stops at the first float op). `split_prelu_model` writes it as
  relu(x) + alpha * (x - relu(x)) in ops that quantize and delegate (MUL by 1 with a fused RELU, SUB,
  MUL, ADD): bit-exact in float; MediaPipe face_landmark 74 -> 166 int8 ops and no float op, same
  fidelity. Not for XNNPACK CPUs: there the four int8 ops cost more than one float PRELU and its
  converts (face_landmark 3.8 -> 4.6 ms, iris_landmark 1.6 -> 2.4 ms, 1 thread, interleaved runs).
`rewrite_float_model` handles the first four (folds the constants into float32, fixes the codes,
fuses the activations); `int8_activation_model` (edgeq convert, int8 activations) writes the
standalone activations it could not fuse as MUL by 1 with the activation fused, splits HARD_SWISH,
writes a STABLEHLO_REDUCE_WINDOW over whole axes (litert-torch's adaptive pooling) as a SUM or
REDUCE_MAX, and on int8 accelerators splits PRELU. Both remove
the ops, tensors, buffers and operator codes that became dead; the graph computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tflite_edit as te


@dataclass(frozen=True)
class RewriteReport:
    opcodes_upgraded: int = 0  # operator codes that had only deprecated_builtin_code
    densified: int = 0  # DENSIFY ops of constants replaced by dense constants
    fp16_folded: int = 0  # DEQUANTIZE of float16 constants folded into float32 constants
    int8_folded: int = 0  # DEQUANTIZE of int8/uint8 constants (weight-only files) folded
    activations_fused: int = 0  # standalone RELU-family ops fused into their producer
    prelu_split: int = 0  # PRELU ops written as MUL(+RELU)/SUB/MUL/ADD for int8 (int8_activation_model)
    relu_as_mul: int = 0  # standalone RELU-family ops written as MUL by 1 with the activation fused (int8)
    hard_swish_split: int = 0  # HARD_SWISH written as x * (relu6(x + 3) / 6) in ADD/MUL ops (int8)
    reduce_windows: int = 0  # STABLEHLO_REDUCE_WINDOW over whole axes written as SUM/REDUCE_MAX/MIN (int8)
    removed_ops: int = 0
    removed_tensors: int = 0
    removed_buffers: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.opcodes_upgraded or self.densified or self.fp16_folded or self.int8_folded
                    or self.activations_fused or self.prelu_split or self.relu_as_mul
                    or self.hard_swish_split or self.reduce_windows)

    def notes(self) -> tuple[str, ...]:
        said = ((self.fp16_folded, "float16 weight(s) behind DEQUANTIZE were folded into float32 constants "
                 "before quantizing"),
                (self.int8_folded, "int8 weight-only constant(s) behind DEQUANTIZE were dequantized to float32 "
                 "before re-quantizing"),
                (self.densified, "sparse weight(s) behind DENSIFY were densified (the int8 model stores them "
                 "dense)"),
                (self.activations_fused, "standalone RELU/RELU6 op(s) fused into the op before them (XNNPACK "
                 "has no int8 kernel for them alone)"),
                (self.prelu_split, "PRELU op(s) were written as relu(x) + alpha * (x - relu(x)) (MUL, SUB, MUL, "
                 "ADD; the same function) so they run int8: the LiteRT quantizer and XNNPACK have no int8 PRELU"),
                (self.relu_as_mul, "standalone RELU/RELU6 op(s) whose input other ops also read were written as "
                 "MUL by 1 with the activation fused (the same function): XNNPACK has no int8 kernel for them "
                 "alone, so each one cut the delegated graph"),
                (self.hard_swish_split, "HARD_SWISH / RELU_0_TO_1 op(s) were written as x * (relu6(x + 3) / 6) "
                 "and relu6(6x) / 6 (ADD or MUL with RELU6, then MULs; the same functions): XNNPACK has no int8 "
                 "kernel for either, so each one cut the delegated graph"),
                (self.reduce_windows, "STABLEHLO_REDUCE_WINDOW op(s) over whole axes were written as SUM / "
                 "REDUCE_MAX over those axes (the same function): the LiteRT quantizer cannot calibrate the "
                 "reduction in their body subgraph"),
                (self.opcodes_upgraded, "operator code(s) in the old deprecated_builtin_code form were "
                 "rewritten to the current schema"))
        return tuple(f"{n} {text}" for n, text in said if n)

    def to_json(self) -> dict:
        return dict(vars(self))


def rewrite_float_model(model: bytes) -> tuple[bytes, RewriteReport]:
    """(rewritten model, what was done). Returns `model` itself when there was nothing to do."""
    m = te.load(model)
    upgraded = upgrade_opcodes(m)
    densified = densify_constants(m)
    fp16, int8 = fold_dequantize(m)
    fused = fuse_activations(m)
    report = RewriteReport(upgraded, densified, fp16, int8, fused)
    if not report.changed:
        return model, report
    tensors, buffers = prune(m)
    removed = densified + fp16 + int8 + fused
    return te.pack(m), RewriteReport(upgraded, densified, fp16, int8, fused, removed_ops=removed,
                                     removed_tensors=tensors, removed_buffers=buffers)


def int8_activation_model(model: bytes, accelerator: bool) -> tuple[bytes, RewriteReport]:
    """A float .tflite (any source's) for int8 activations (sources.for_int8_activations): standalone
    RELU-family ops as MUL by 1 with the activation fused (relus_as_mul), HARD_SWISH in ADD/MUL ops
    (split_hard_swish), whole-axis STABLEHLO_REDUCE_WINDOWs as reductions (reduce_windows_as_reductions),
    and on an int8 accelerator PRELU split (split_prelus); `model` itself if there was nothing to do."""
    m = te.load(model)
    relus = relus_as_mul(m)
    swish = split_hard_swish(m) + split_relu_0_to_1(m)
    split = split_prelus(m) if accelerator else 0
    windows = reduce_windows_as_reductions(m)
    if not relus and not split and not swish and not windows:
        return model, RewriteReport()
    tensors, buffers = prune(m)
    return te.pack(m), RewriteReport(prelu_split=split, relu_as_mul=relus, hard_swish_split=swish,
                                     reduce_windows=windows, removed_tensors=tensors, removed_buffers=buffers,
                                     removed_ops=split + relus + swish)


def int16_activation_model(model: bytes) -> tuple[bytes, RewriteReport]:
    """A float .tflite for int16 activations (sources.for_int16_activations): whole-axis
    STABLEHLO_REDUCE_WINDOWs as reductions, which the LiteRT quantizer cannot calibrate at any
    width; the int8-only rewrites (XNNPACK's int8 kernels) are not needed there. `model` itself if
    there was nothing to do."""
    if not te.has_ops(model, {"STABLEHLO_REDUCE_WINDOW"}):
        return model, RewriteReport()
    m = te.load(model)
    windows = reduce_windows_as_reductions(m)
    if not windows:
        return model, RewriteReport()
    tensors, buffers = prune(m)
    return te.pack(m), RewriteReport(reduce_windows=windows, removed_tensors=tensors, removed_buffers=buffers)


# Ops whose bias (input 2, TRANSPOSE_CONV's input 3) the quantizer stores per output channel.
_BIAS_INPUT = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}


def flat_biases(model: bytes) -> tuple[bytes, int]:
    """(model with every constant bias shaped [1, 1, 1, C] reshaped [C], how many); `model` itself
    if none. litert-torch folds a ConvTranspose's separate bias ADD and BatchNorm into the
    TRANSPOSE_CONV with the ADD's broadcast shape (PaddleOCR v4's text detector); float kernels read
    it flat, but the LiteRT quantizer then gives it C int32 scales along its first axis, of size 1,
    and LiteRT refuses the model ("num_scales must be 1 ... but got 24"). The same values, flat."""
    if not te.has_ops(model, _BIAS_INPUT):
        return model, 0
    m = te.load(model)
    n = 0
    for sg in m.subgraphs or []:
        readers = te.consumers(sg)
        for op in sg.operators or []:
            k = _BIAS_INPUT.get(te.op_name(m, op))
            ins = te.ints(op.inputs)
            if k is None or len(ins) <= k or ins[k] < 0:
                continue
            t = sg.tensors[ins[k]]
            shape = [int(d) for d in (t.shape if t.shape is not None else [])]
            value = te.constant(m, sg, ins[k])
            if len(shape) < 2 or value is None or sorted(shape)[:-1] != [1] * (len(shape) - 1):
                continue
            if len(readers.get(ins[k], [])) > 1:  # another op reads it at that shape: a copy of its own
                b = _new_tensor(sg, t, "flat")
                sg.tensors[b].type = t.type
                op.inputs = [b if j == k else x for j, x in enumerate(ins)]
                te.set_constant(m, sg, b, value.reshape(-1), new_buffer=True)
            else:
                t.shape = np.asarray([value.size], np.int32)
                t.shapeSignature = None
            n += 1
    return (te.pack(m), n) if n else (model, 0)


def upgrade_opcodes(m) -> int:
    """Fill builtin_code from deprecated_builtin_code (files written before schema v3a)."""
    n = 0
    for code in m.operatorCodes or []:
        num = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if code.builtinCode != num:
            code.builtinCode = num
            n += 1
        code.deprecatedBuiltinCode = min(num, te.PLACEHOLDER_FOR_GREATER_OP_CODES)
    return n


# --- DENSIFY ---------------------------------------------------------------------------------------

def densify_constants(m) -> int:
    """Replace each DENSIFY of a sparse constant by the dense constant (same dtype); the op goes."""
    def dense(sg, op):
        src = sg.tensors[int(op.inputs[0])]
        out = int(op.outputs[0])
        te.set_constant(m, sg, out, densify(m, src).astype(te.numpy_dtype(src)), new_buffer=True)
        sg.tensors[out].sparsity = None
        return "densified"

    return _fold_constant_ops(m, "DENSIFY", dense).get("densified", 0)


def _fold_constant_ops(m, op_name: str, fold) -> dict[str, int]:
    """Drop every `op_name` op whose one input is a constant and whose output is not a graph output,
    once fold(sg, op) has stored its output as a constant and said what it did (None: not folded, the
    op stays). Counts per what fold said."""
    done: dict[str, int] = {}
    for sg in m.subgraphs or []:
        outputs = set(te.ints(sg.outputs))
        keep = []
        for op in sg.operators or []:
            what = fold(sg, op) if te.op_name(m, op) == op_name and _foldable(m, sg, op, outputs) else None
            if what is None:
                keep.append(op)
            else:
                done[what] = done.get(what, 0) + 1
        sg.operators = keep
    return done


def densify(m, t) -> np.ndarray:
    """The dense value of sparse constant tensor `t` (a TensorT with `sparsity`), shaped `t.shape`.

    TFLite's format (schema.fbs SparsityParameters; kernels/internal/utils/sparsity_format_converter):
    the tensor is traversed in `traversal_order` over its dims followed by one dim per blocked dim
    (`block_map[k]` is the original dim block k splits, the block's size is that level's dense_size);
    level i is DENSE (`dense_size` entries) or SPARSE_CSR (`array_segments` delimit, per position of
    the previous level, the `array_indices` present). Values are stored in that traversal order.
    """
    sp = t.sparsity
    shape = [int(d) for d in t.shape]
    rank = len(shape)
    order = [int(x) for x in sp.traversalOrder]
    block_map = [int(x) for x in (sp.blockMap if sp.blockMap is not None else [])]
    meta = sp.dimMetadata
    values = _raw_values(m, t)
    # Enumerate, level by level, every stored element's per-level index and its position at that level
    # (the position indexes the next level's segments), in storage order.
    pos = np.zeros(1, dtype=np.int64)
    idx = np.zeros((1, 0), dtype=np.int64)
    for d in meta:
        if int(d.format) == 0:  # DENSE
            size = int(d.denseSize)
            rep = np.repeat(np.arange(len(pos)), size)
            level = np.tile(np.arange(size, dtype=np.int64), len(pos))
            pos = pos[rep] * size + level
        else:  # SPARSE_CSR
            seg = _vector(d.arraySegments)
            ind = _vector(d.arrayIndices)
            starts, ends = seg[pos], seg[pos + 1]
            counts = ends - starts
            rep = np.repeat(np.arange(len(pos)), counts)
            # flat positions starts[r] .. ends[r]-1 for every row r, in order
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            pos = np.repeat(starts, counts) + offsets
            level = ind[pos]
        idx = np.concatenate([idx[rep], level[:, None]], axis=1)
    if len(pos) != values.size:
        raise ValueError(f"sparse tensor {te.tensor_name(t)}: {values.size} stored values, {len(pos)} indexed")
    coords = np.zeros((len(pos), rank), dtype=np.int64)
    for level in range(rank):
        coords[:, order[level]] = idx[:, level]
    block_size = [0] * len(block_map)
    for level in range(rank, len(order)):
        k = order[level] - rank
        block_size[k] = int(meta[level].denseSize)
    for level in range(rank, len(order)):  # block coordinates refine their original dim
        k = order[level] - rank
        dim = block_map[k]
        coords[:, dim] = coords[:, dim] * block_size[k] + idx[:, level]
    dense = np.zeros(shape, dtype=values.dtype)
    dense[tuple(coords.T)] = values
    return dense


def _raw_values(m, t) -> np.ndarray:
    buf = m.buffers[t.buffer]
    return np.frombuffer(bytes(np.asarray(buf.data, dtype=np.uint8)), dtype=te.numpy_dtype(t))


def _vector(v) -> np.ndarray:
    return np.asarray(v.values if v is not None and v.values is not None else [], dtype=np.int64)


# --- DEQUANTIZE of constants ----------------------------------------------------------------------

def fold_dequantize(m) -> tuple[int, int]:
    """Fold DEQUANTIZE ops whose input is a constant into float32 constants; (float16, int8) counts."""
    def dequantized(sg, op):
        src = sg.tensors[int(op.inputs[0])]
        value = _dequantized(m, sg, int(op.inputs[0]))
        if value is None:
            return None
        out = int(op.outputs[0])
        # A buffer of its own: the output's old (empty) buffer may be shared.
        te.set_constant(m, sg, out, value, new_buffer=True)
        sg.tensors[out].quantization = None
        return "fp16" if src.type == 1 else "int8"  # 1: FLOAT16

    done = _fold_constant_ops(m, "DEQUANTIZE", dequantized)
    return done.get("fp16", 0), done.get("int8", 0)


def _dequantized(m, sg, index: int) -> np.ndarray | None:
    t = sg.tensors[index]
    value = te.constant(m, sg, index)
    if value is None or t.sparsity is not None:
        return None
    if value.dtype == np.float16:
        return value.astype(np.float32)
    if value.dtype not in (np.int8, np.uint8, np.int16):
        return None
    p = te.qparams(t)
    if p is None:
        return None
    scale, zp = p[0].astype(np.float32), p[1].astype(np.float32)
    if len(scale) > 1:  # per-channel along quantizedDimension
        shape = [1] * value.ndim
        shape[int(t.quantization.quantizedDimension)] = len(scale)
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((value.astype(np.float32) - zp) * scale).astype(np.float32)


def _foldable(m, sg, op, graph_outputs: set[int]) -> bool:
    """A one-in one-out op whose input is a constant and whose output is not a graph output."""
    ins, outs = te.ints(op.inputs), te.ints(op.outputs)
    if len(ins) != 1 or len(outs) != 1 or ins[0] < 0 or outs[0] in graph_outputs:
        return False
    t = sg.tensors[ins[0]]
    buf = m.buffers[t.buffer] if t.buffer < len(m.buffers) else None
    return buf is not None and buf.data is not None and len(buf.data) > 0


# --- activations ---------------------------------------------------------------------------------

_ACTIVATIONS = {"RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}  # schema ActivationFunctionType
_FUSING_OPS = frozenset({"ADD", "SUB", "MUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})


def fuse_activations(m) -> int:
    """Fuse a RELU/RELU6/RELU_N1_TO_1 into the op producing its input, when that op can carry a fused
    activation, has none yet, and nothing else reads the intermediate tensor."""
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        keep_visible = te.visible_outputs(m, sg_i)
        readers = te.consumers(sg)
        producer = te.producers(sg)
        drop: set[int] = set()
        for i, op in enumerate(sg.operators or []):
            act = _ACTIVATIONS.get(te.op_name(m, op))
            ins = te.ints(op.inputs)
            if act is None or len(ins) != 1 or ins[0] in keep_visible or len(readers.get(ins[0], [])) != 1:
                continue
            p = producer.get(ins[0])
            if p is None or p in drop:
                continue
            prod = sg.operators[p]
            opts = prod.builtinOptions
            if (te.op_name(m, prod) not in _FUSING_OPS or len(te.ints(prod.outputs)) != 1 or opts is None
                    or getattr(opts, "fusedActivationFunction", None) != 0):
                continue
            opts.fusedActivationFunction = act
            prod.outputs = [int(op.outputs[0])]
            producer[int(op.outputs[0])] = p
            drop.add(i)
            n += 1
        sg.operators = [op for i, op in enumerate(sg.operators or []) if i not in drop]
    return n


# --- PRELU ----------------------------------------------------------------------------------------

def split_prelus(m) -> int:
    """Write each PRELU with a constant alpha as relu(x) + alpha * (x - relu(x)): r = MUL(x, 1) with a
    fused RELU (a standalone RELU has no XNNPACK int8 kernel), n = SUB(x, r) (= min(x, 0)),
    a = MUL(n, alpha), y = ADD(r, a). One of r and a is 0 for each value, so float results are
    bit-exact; the new ops keep the PRELU's output tensor."""
    n = 0
    for sg in m.subgraphs or []:
        ops = []
        for op in sg.operators or []:
            ins = te.ints(op.inputs)
            if te.op_name(m, op) != "PRELU" or len(ins) != 2 or te.constant(m, sg, ins[1]) is None:
                ops.append(op)
                continue
            x, alpha, y = ins[0], ins[1], int(op.outputs[0])
            one = _new_tensor(sg, sg.tensors[x], "prelu_one")
            te.set_constant(m, sg, one, np.ones([1], np.float32), new_buffer=True)
            r, neg, scaled = (_new_tensor(sg, sg.tensors[x], w) for w in ("prelu_relu", "prelu_min0", "prelu_scaled"))
            relu = _ACTIVATIONS["RELU"]
            ops += [_new_op(m, "MUL", [x, one], r, relu), _new_op(m, "SUB", [x, r], neg),
                    _new_op(m, "MUL", [neg, alpha], scaled), _new_op(m, "ADD", [r, scaled], y)]
            n += 1
        sg.operators = ops
    return n


def relus_as_mul(m) -> int:
    """Write each standalone RELU / RELU6 / RELU_N1_TO_1 as MUL(x, 1) with that activation fused: the
    same function, but XNNPACK runs an int8 MUL and has no int8 kernel for these alone, so each cut
    the delegated graph (NASNetMobile: 48 RELUs whose input a residual branch also reads; int8 on this
    x86 host 100 -> 79 ms, 1 thread). fuse_activations takes the ones it can first (.tflite sources)."""
    n = 0
    for sg in m.subgraphs or []:
        ops = []
        for op in sg.operators or []:
            act = _ACTIVATIONS.get(te.op_name(m, op))
            ins, outs = te.ints(op.inputs), te.ints(op.outputs)
            if act is None or len(ins) != 1 or len(outs) != 1 or sg.tensors[ins[0]].type != 0:  # 0: FLOAT32
                ops.append(op)
                continue
            one = _new_tensor(sg, sg.tensors[ins[0]], "relu_one")
            te.set_constant(m, sg, one, np.ones([1], np.float32), new_buffer=True)
            ops.append(_new_op(m, "MUL", [ins[0], one], outs[0], act))
            n += 1
        sg.operators = ops
    return n


def split_hard_swish(m) -> int:
    """Write each HARD_SWISH as g = ADD(x, 3) with a fused RELU6, h = MUL(g, 1/6), y = MUL(x, h): the
    same function (to float rounding), in ops XNNPACK runs in int8; it has no int8 HARD_SWISH, so
    MobileNetV3's 21 ran on the builtin kernels in 23 delegated partitions. g and h have fixed ranges
    ([0, 6], [0, 1]), so their int8 steps are fine."""
    def ops(m, sg, x: int, y: int) -> list:
        three, sixth = _float_scalar(m, sg, x, "hswish_three", 3.0), _float_scalar(m, sg, x, "hswish_sixth", 1 / 6)
        gate, scaled = _new_tensor(sg, sg.tensors[x], "hswish_gate"), _new_tensor(sg, sg.tensors[x], "hswish_gate6")
        return [_new_op(m, "ADD", [x, three], gate, _ACTIVATIONS["RELU6"]), _new_op(m, "MUL", [gate, sixth], scaled),
                _new_op(m, "MUL", [x, scaled], y)]

    return _split_unary(m, "HARD_SWISH", ops)


def split_relu_0_to_1(m) -> int:
    """Write each RELU_0_TO_1 (a hard sigmoid's clamp: onnx2torch's HardSigmoid, the squeeze-excite
    gates of PP-LCNet and MobileNetV3) as g = MUL(x, 6) with a fused RELU6, y = MUL(g, 1/6): the same
    function, in ops XNNPACK runs in int8. The LiteRT quantizer has no int8 RELU_0_TO_1 and XNNPACK no
    int8 kernel for it, so each one cut the delegated graph (PaddleOCR's direction classifier: 9 in
    11 partitions)."""
    def ops(m, sg, x: int, y: int) -> list:
        six, sixth = _float_scalar(m, sg, x, "relu01_six", 6.0), _float_scalar(m, sg, x, "relu01_sixth", 1 / 6)
        scaled = _new_tensor(sg, sg.tensors[x], "relu01_x6")
        return [_new_op(m, "MUL", [x, six], scaled, _ACTIVATIONS["RELU6"]), _new_op(m, "MUL", [scaled, sixth], y)]

    return _split_unary(m, "RELU_0_TO_1", ops)


def _split_unary(m, name: str, ops) -> int:
    """Replace every float op `name` of one input and one output by ops(m, sg, x, y) (its input and
    output tensor indices); how many were replaced."""
    n = 0
    for sg in m.subgraphs or []:
        new = []
        for op in sg.operators or []:
            ins, outs = te.ints(op.inputs), te.ints(op.outputs)
            if te.op_name(m, op) != name or len(ins) != 1 or len(outs) != 1 or sg.tensors[ins[0]].type != 0:  # FLOAT32
                new.append(op)
                continue
            new += ops(m, sg, ins[0], outs[0])
            n += 1
        sg.operators = new
    return n


def _float_scalar(m, sg, like: int, suffix: str, value: float) -> int:
    """A new [1] float32 constant named after tensor `like`; its index."""
    t = _new_tensor(sg, sg.tensors[like], suffix)
    te.set_constant(m, sg, t, np.full([1], value, np.float32), new_buffer=True)
    return t


def outputs_read_inside(model: bytes) -> tuple[bytes, int]:
    """(model, how many): each float graph output that another op also reads gets a tensor of its own,
    written by a RESHAPE to its own shape (the same values), keeping the output's name. The LiteRT
    quantizer dequantized such an output in place and left its reader a FULLY_CONNECTED with a float
    input and an int8 output, which the builtin kernels refuse ("fully_connected.cc:284 output->type
    != kTfLiteFloat32"): a recurrent state returned and read on (`model` itself if none)."""
    s = te.schema()
    m0 = s.Model.GetRootAs(model, 0)
    if m0.SubgraphsLength() == 0:
        return model, 0
    g = m0.Subgraphs(0)
    outs0 = set(int(i) for i in g.OutputsAsNumpy()) if g.OutputsLength() else set()
    read0 = {int(i) for k in range(g.OperatorsLength()) for i in (g.Operators(k).InputsAsNumpy()
                                                                   if g.Operators(k).InputsLength() else [])}
    if not outs0 & read0:
        return model, 0
    m = te.load(model)
    sg = m.subgraphs[0]
    read = {i for op in sg.operators or [] for i in te.ints(op.inputs) if i >= 0}
    outs = list(te.ints(sg.outputs))
    n = 0
    for k, t in enumerate(outs):
        tensor = sg.tensors[t]
        if t not in read or tensor.type != 0 or tensor.shape is None:
            continue
        new = _new_tensor(sg, tensor, "out")
        name = te.tensor_name(tensor)
        sg.tensors[new].name, tensor.name = name.encode(), f"{name}/inner".encode()
        shape = s.TensorT()
        shape.name, shape.type, shape.shape = f"{name}/shape".encode(), 2, np.array([len(tensor.shape)], np.int32)
        sg.tensors.append(shape)
        te.set_constant(m, sg, len(sg.tensors) - 1, np.array(tensor.shape, np.int32), new_buffer=True)
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = te.opcode_index(m, "RESHAPE"), [t, len(sg.tensors) - 1], [new]
        options = s.ReshapeOptionsT()
        options.newShape = [int(d) for d in tensor.shape]
        op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.ReshapeOptions, options
        sg.operators.append(op)
        outs[k] = new
        for sd in m.signatureDefs or []:
            for o in sd.outputs or []:
                if o.tensorIndex == t:
                    o.tensorIndex = new
        n += 1
    if not n:
        return model, 0
    sg.outputs = np.array(outs, np.int32)
    return te.pack(m), n


def _new_tensor(sg, like, suffix: str) -> int:
    """A float32 activation tensor shaped as `like`, named after it; its index."""
    t = te.schema().TensorT()
    t.name = f"{te.tensor_name(like)}/{suffix}".encode()
    t.type, t.buffer = 0, 0  # FLOAT32, no data
    t.shape = None if like.shape is None else np.array(like.shape, dtype=np.int32)
    t.shapeSignature = None if like.shapeSignature is None else np.array(like.shapeSignature, dtype=np.int32)
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _new_op(m, name: str, inputs: list[int], output: int, activation: int = 0):
    """An ADD/SUB/MUL OperatorT (operator code added if the model has none yet)."""
    s = te.schema()
    index = te.opcode_index(m, name)
    options = getattr(s, f"{name.title()}OptionsT")()
    options.fusedActivationFunction = activation
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = index, inputs, [output]
    op.builtinOptionsType, op.builtinOptions = getattr(s.BuiltinOptions, f"{name.title()}Options"), options
    return op


# --- STABLEHLO_REDUCE_WINDOW ------------------------------------------------------------------------

_REDUCERS = {"ADD": ("SUM", 0.0), "MAXIMUM": ("REDUCE_MAX", -np.inf), "MINIMUM": ("REDUCE_MIN", np.inf)}


def reduce_windows_as_reductions(m) -> int:
    """Write each STABLEHLO_REDUCE_WINDOW whose window spans whole axes (and leaves the others alone) as
    SUM / REDUCE_MAX / REDUCE_MIN over those axes, keep_dims: litert-torch lowers torch's
    AdaptiveAvgPool2d((None, 1)) (easyocr's CRNN recognizers) to one, with an ADD in a body subgraph
    the LiteRT quantizer cannot calibrate ("STABLEHLO_REDUCE_WINDOW1_arg0 ... not found in
    tensor_name_to_qsv": a traceback, for the bare quantizer too). Body subgraphs nothing else
    reads are dropped."""
    n = 0
    sg = m.subgraphs[0]
    new = []
    for op in sg.operators or []:
        rewritten = _reduction(m, sg, op) if te.op_name(m, op) == "STABLEHLO_REDUCE_WINDOW" else None
        new.append(rewritten or op)
        n += rewritten is not None
    sg.operators = new
    if n:
        _drop_unread_subgraphs(m)
    return n


def _reduction(m, sg, op):
    """The SUM/REDUCE_MAX/REDUCE_MIN op `op` computes, or None when it is another window."""
    o = op.builtinOptions2
    ins, outs = te.ints(op.inputs), te.ints(op.outputs)
    x = sg.tensors[ins[0]] if ins else None
    if o is None or x is None or x.type != 0 or x.shape is None or len(ins) != 2 or len(outs) != 1:
        return None
    body = m.subgraphs[o.bodySubgraphIndex] if 0 < o.bodySubgraphIndex < len(m.subgraphs) else None
    if body is None or len(body.operators or []) != 1:
        return None
    reducer = _REDUCERS.get(te.op_name(m, body.operators[0]))
    init = te.constant(m, sg, ins[1])
    shape = [int(d) for d in x.shape]
    window, strides = [int(v) for v in o.windowDimensions], [int(v) for v in o.windowStrides]
    if (reducer is None or init is None or init.size != 1 or float(init.reshape(-1)[0]) != reducer[1]
            or len(window) != len(shape) or any(int(v) != 1 for v in np.concatenate([o.baseDilations, o.windowDilations]))
            or any(int(v) != 0 for v in o.padding)):
        return None
    axes = [i for i, w in enumerate(window) if w != 1]
    if not axes or any(window[i] != shape[i] for i in axes) or any(
            strides[i] != 1 for i in range(len(shape)) if i not in axes):
        return None
    s = te.schema()
    axis_t = _new_tensor(sg, sg.tensors[outs[0]], "axes")
    te.set_constant(m, sg, axis_t, np.array(axes, np.int32), new_buffer=True)
    out = s.OperatorT()
    out.opcodeIndex, out.inputs, out.outputs = te.opcode_index(m, reducer[0]), [ins[0], axis_t], [outs[0]]
    options = s.ReducerOptionsT()
    options.keepDims = True
    out.builtinOptionsType, out.builtinOptions = s.BuiltinOptions.ReducerOptions, options
    return out


def _drop_unread_subgraphs(m) -> None:
    """Drop the subgraphs after the first when no op reads any of them (their indices need no
    renumbering then)."""
    for sg in m.subgraphs:
        for op in sg.operators or []:
            for opt in (op.builtinOptions, getattr(op, "builtinOptions2", None)):
                if opt is not None and any("ubgraph" in k for k in vars(opt)):
                    return
    m.subgraphs = m.subgraphs[:1]


# --- dead code ------------------------------------------------------------------------------------

def prune(m) -> tuple[int, int]:
    """Drop tensors no op or signature uses, unreferenced buffers and unused operator codes; indices
    are remapped everywhere they appear (ops, subgraph I/O, signatures, metadata). (tensors, buffers)
    removed."""
    removed_t = 0
    used_buffers = {0}  # buffer 0 is the schema's empty sentinel
    for sg_i, sg in enumerate(m.subgraphs or []):
        used = set(te.ints(sg.inputs)) | set(te.ints(sg.outputs))
        for op in sg.operators or []:
            used |= {t for t in te.ints(op.inputs) + te.ints(op.outputs) + te.ints(op.intermediates) if t >= 0}
        for sig in m.signatureDefs or []:
            if sig.subgraphIndex == sg_i:
                used |= {int(tm.tensorIndex) for tm in (sig.inputs or []) + (sig.outputs or [])}
        old = list(sg.tensors or [])
        kept, remap = _keep(old, used)
        removed_t += len(old) - len(kept)
        sg.tensors = kept

        for op in sg.operators or []:
            op.inputs, op.outputs = _remap(op.inputs, remap), _remap(op.outputs, remap)
            op.intermediates = _remap(op.intermediates, remap)
        sg.inputs, sg.outputs = _remap(sg.inputs, remap), _remap(sg.outputs, remap)
        for sig in m.signatureDefs or []:
            if sig.subgraphIndex == sg_i:
                for tm in (sig.inputs or []) + (sig.outputs or []):
                    tm.tensorIndex = remap[int(tm.tensorIndex)]
        used_buffers |= {int(t.buffer) for t in kept}
    used_buffers |= {int(md.buffer) for md in (m.metadata or [])}
    used_buffers |= set(te.ints(m.metadataBuffer))
    old_buffers = list(m.buffers or [])
    new_buffers, bmap = _keep(old_buffers, used_buffers)
    m.buffers = new_buffers
    for sg in m.subgraphs or []:
        for t in sg.tensors:
            t.buffer = bmap[int(t.buffer)]
    for md in m.metadata or []:
        md.buffer = bmap[int(md.buffer)]
    if m.metadataBuffer is not None:
        m.metadataBuffer = [bmap[int(b)] for b in m.metadataBuffer]
    # Operator codes no op uses (the removed DEQUANTIZE/DENSIFY) go too.
    used_codes = {int(op.opcodeIndex) for sg in m.subgraphs or [] for op in sg.operators or []}
    m.operatorCodes, cmap = _keep(m.operatorCodes, used_codes)
    for sg in m.subgraphs or []:
        for op in sg.operators or []:
            op.opcodeIndex = cmap[int(op.opcodeIndex)]
    return removed_t, len(old_buffers) - len(new_buffers)


def _keep(items: list, used: set[int]) -> tuple[list, dict[int, int]]:
    """The items whose index is in `used`, in order, and old index -> new index."""
    index = [i for i in range(len(items)) if i in used]
    return [items[i] for i in index], {old: new for new, old in enumerate(index)}


def _remap(xs, remap: dict[int, int]):
    return None if xs is None else [remap[int(x)] if int(x) >= 0 else -1 for x in xs]

