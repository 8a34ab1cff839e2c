"""Make a quantized model's parameters satisfy what the int8 (and int16x8) kernels require.

Whichever backend wrote the model (TF converter or LiteRT quantizer), TFLite's builtin kernels and
XNNPACK accept it only if:
- conv / depthwise / fully-connected / transpose-conv filters are symmetric: every zero point 0
  (kernels/conv.cc, depthwise_conv.cc, fully_connected.cc check it at prepare; XNNPACK's per-channel
  int8 type needs it too), and each int32 bias has scale input_scale * filter_scale[c]
  (kernels/kernel_util.cc PopulateConvolutionQuantizationParams, 1e-6 relative);
- ops that move int8 values without arithmetic (pooling, concatenation, pad, reshape, transpose,
  slicing, gather, resize, ...) have one scale and zero point on their data inputs and outputs:
  the builtin kernels copy raw values (max_pool, reshape, pad, ...) and XNNPACK refuses to delegate
  them otherwise ("failed to delegate MAX_POOL_2D node"). TFLite's converter gives these ops
  "same operands and results scale"; edgeq does what it does: the tensors such ops tie together
  share the union of their calibrated ranges;
- LOGISTIC / SOFTMAX / TANH / LOG_SOFTMAX have the fixed output parameters their kernels check.

`enforce` repairs what it can (re-quantizes filters symmetric per-channel, merges ranges, re-quantizes
constants and biases whose scales moved) and raises QuantizationError naming the op for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tflite_edit as te
from .errors import QuantizationError

INT8, INT16, UINT8, INT32 = 9, 7, 3, 2  # schema TensorType
_RANGE = {INT8: (-128, 127), UINT8: (0, 255), INT16: (-32768, 32767)}

# op -> (index of the filter input, axis of its output channels, index of the bias input)
FILTER_OPS: dict[str, tuple[int, int, int]] = {
    "CONV_2D": (1, 0, 2), "DEPTHWISE_CONV_2D": (1, 3, 2), "FULLY_CONNECTED": (1, 0, 2),
    "TRANSPOSE_CONV": (1, 0, 3), "CONV_3D": (1, 4, 2),
}

# Ops whose listed inputs ("all": every input) and all outputs must share scale and zero point.
SAME_SCALE_OPS: dict[str, tuple[int, ...] | str] = {
    "MAX_POOL_2D": (0,), "AVERAGE_POOL_2D": (0,), "CONCATENATION": "all", "PACK": "all",
    "RESHAPE": (0,), "SQUEEZE": (0,), "EXPAND_DIMS": (0,), "TRANSPOSE": (0,),
    "PAD": (0,), "PADV2": (0, 2), "MIRROR_PAD": (0,),
    "SPACE_TO_DEPTH": (0,), "DEPTH_TO_SPACE": (0,), "SPACE_TO_BATCH_ND": (0,), "BATCH_TO_SPACE_ND": (0,),
    "GATHER": (0,), "GATHER_ND": (0,), "SLICE": (0,), "STRIDED_SLICE": (0,),
    "SPLIT": (1,), "SPLIT_V": (0,), "UNPACK": (0,), "TILE": (0,), "BROADCAST_TO": (0,), "REVERSE_V2": (0,),
    "RESIZE_NEAREST_NEIGHBOR": (0,), "RESIZE_BILINEAR": (0,),
    "MAXIMUM": (0, 1), "MINIMUM": (0, 1), "REDUCE_MAX": (0,), "REDUCE_MIN": (0,),
    "SELECT": (1, 2), "SELECT_V2": (1, 2),
}

# Fixed output (scale, zero point) per output dtype (kernels/activations.cc Prepare).
FIXED_OUTPUT: dict[str, dict[int, tuple[float, int]]] = {
    "LOGISTIC": {INT8: (1 / 256, -128), UINT8: (1 / 256, 0), INT16: (1 / 32768, 0)},
    "SOFTMAX": {INT8: (1 / 256, -128), UINT8: (1 / 256, 0), INT16: (1 / 32768, 0)},
    "TANH": {INT8: (1 / 128, 0), UINT8: (1 / 128, 128), INT16: (1 / 32768, 0)},
    "LOG_SOFTMAX": {INT8: (16 / 256, 127), UINT8: (16 / 256, 255)},
}

_BIAS_TOLERANCE = 1e-6  # relative; kernel_util.cc


@dataclass(frozen=True)
class Violation:
    subgraph: int
    op_index: int
    op: str
    reason: str

    def __str__(self) -> str:
        return f"#{self.op_index} {self.op}: {self.reason}"


@dataclass(frozen=True)
class EnforceReport:
    filters_requantized: int = 0  # asymmetric filters made symmetric per-channel
    groups_merged: int = 0  # same-scale groups whose tensors got one shared range
    tensors_changed: int = 0  # activation/constant tensors whose scale or zero point changed
    fixed_outputs: int = 0  # LOGISTIC/SOFTMAX/TANH outputs set to their kernels' fixed parameters
    biases_requantized: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.filters_requantized or self.tensors_changed or self.fixed_outputs
                    or self.biases_requantized)

    def notes(self) -> tuple[str, ...]:
        said = ((self.filters_requantized, "asymmetric filter(s) re-quantized symmetric per-channel (the int8 "
                 "kernels need zero point 0)"),
                (self.tensors_changed, f"tensor(s) in {self.groups_merged} group(s) of pooling/concat/"
                 "reshape-like ops given one shared scale (the int8 kernels need it)"),
                (self.fixed_outputs, "LOGISTIC/SOFTMAX/TANH output(s) set to the kernels' fixed scale"),
                (self.biases_requantized, "bias(es) re-quantized to input scale x filter scale"))
        return tuple(f"{n} {text}" for n, text in said if n)

    def to_json(self) -> dict:
        return dict(vars(self))


# --- unread outputs ------------------------------------------------------------------------------

# Ops that hand out parts of one data input (its index): their kernels require every output to be of
# the input's type (kernels/unpack.cc "output->type != input->type"), read or not.
PART_OPS = {"UNPACK": 0, "SPLIT": 1, "SPLIT_V": 0}


def typed_unread_outputs(model: bytes) -> tuple[bytes, int]:
    """(model with the unread outputs of int8 UNPACK / SPLIT ops given the input's type and parameters,
    how many). The LiteRT quantizer leaves an output no op reads float: MediaPipe's gesture embedder
    unstacks x, y, z and reads x only, and its int8 file failed to prepare ("unpack.cc:79
    FLOAT32 != INT8"; the bare quantizer writes that file without a word)."""
    if not te.has_ops(model, tuple(PART_OPS)):
        return model, 0
    m = te.load(model)
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        read = {t for op in sg.operators or [] for t in te.ints(op.inputs)} | te.visible_outputs(m, sg_i)
        for op in sg.operators or []:
            data = PART_OPS.get(te.op_name(m, op))
            ins = te.ints(op.inputs)
            if data is None or data >= len(ins) or _per_tensor(sg.tensors[ins[data]]) is None:
                continue
            x = sg.tensors[ins[data]]
            for o in te.ints(op.outputs):
                if o not in read and sg.tensors[o].type != x.type:
                    sg.tensors[o].type = x.type
                    _set_params(sg.tensors[o], *_per_tensor(x))
                    n += 1
    return (te.pack(m), n) if n else (model, 0)


# --- reading -------------------------------------------------------------------------------------

def _per_tensor(t) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor quantized integer tensor, else None."""
    if t.type not in _RANGE:
        return None
    p = te.qparams(t)
    if p is None or len(p[0]) != 1:
        return None
    return float(p[0][0]), int(p[1][0])


def _set_params(t, scale, zero_point, axis: int = 0) -> None:
    s = te.schema()
    q = t.quantization or s.QuantizationParametersT()
    q.scale = [float(x) for x in np.atleast_1d(scale)]
    q.zeroPoint = [int(x) for x in np.atleast_1d(zero_point)]
    q.quantizedDimension = int(axis)
    q.min = q.max = None
    t.quantization = q


def _same_scale_tensors(m, sg, op) -> list[int]:
    """The tensors of `op` that must share parameters (empty if the op has no such rule)."""
    rule = SAME_SCALE_OPS.get(te.op_name(m, op))
    if rule is None:
        return []
    ins = te.ints(op.inputs)
    picked = [t for t in ins if t >= 0] if rule == "all" else [ins[i] for i in rule if i < len(ins) and ins[i] >= 0]
    tensors = picked + [t for t in te.ints(op.outputs) if t >= 0]
    quant = [t for t in tensors if _per_tensor(sg.tensors[t]) is not None]
    types = {sg.tensors[t].type for t in quant}
    # Only all-integer ops are tied (a float op around the quantizer's DEQUANTIZE has no rule).
    return quant if len(quant) == len(tensors) and len(types) == 1 else []


# --- checks --------------------------------------------------------------------------------------

def violations(model: bytes) -> list[Violation]:
    """Every kernel requirement the model breaks (empty: it satisfies them all)."""
    m = te.load(model)
    out: list[Violation] = []
    for sg_i, sg in enumerate(m.subgraphs or []):
        for i, op in enumerate(sg.operators or []):
            name = te.op_name(m, op)
            for reason in _op_violations(m, sg, op, name):
                out.append(Violation(sg_i, i, name, reason))
    return out


def _op_violations(m, sg, op, name: str) -> list[str]:
    reasons = []
    ins = te.ints(op.inputs)
    if name in FILTER_OPS:
        w_i = FILTER_OPS[name][0]
        w = sg.tensors[ins[w_i]] if w_i < len(ins) and ins[w_i] >= 0 else None
        if w is not None and w.type in (INT8, INT16) and te.qparams(w) is not None:
            zp = te.qparams(w)[1]
            if np.any(zp != 0):
                reasons.append(f"filter zero point {int(zp[zp != 0][0])} != 0 (filters must be symmetric)")
            else:
                bad = _bias_mismatch(sg, op, name)
                if bad:
                    reasons.append(bad)
    tied = _same_scale_tensors(m, sg, op)
    params = {_per_tensor(sg.tensors[t]) for t in tied}
    if len(params) > 1:
        shown = ", ".join(f"{s:.4g}/{z}" for s, z in sorted(params)[:3])
        reasons.append(f"inputs and outputs must share one scale/zero point, have {shown}")
    fixed = FIXED_OUTPUT.get(name)
    if fixed and te.ints(op.outputs):
        t = sg.tensors[te.ints(op.outputs)[0]]
        want = fixed.get(t.type)
        have = _per_tensor(t)
        if want and have and (abs(have[0] - want[0]) > 1e-9 * want[0] or have[1] != want[1]):
            reasons.append(f"output must be scale {want[0]:.6g} zero point {want[1]}, is {have[0]:.6g}/{have[1]}")
    return reasons


def _bias_mismatch(sg, op, name: str) -> str:
    w_i, _, b_i = FILTER_OPS[name]
    ins = te.ints(op.inputs)
    if b_i >= len(ins) or ins[b_i] < 0 or ins[0] < 0:
        return ""
    inp = _per_tensor(sg.tensors[ins[0]]) if name != "TRANSPOSE_CONV" else _per_tensor(sg.tensors[ins[2]])
    b = sg.tensors[ins[b_i]]
    bp = te.qparams(b)
    wp = te.qparams(sg.tensors[ins[w_i]])
    if inp is None or bp is None or wp is None:
        return ""
    if b.type in (INT8, INT16, UINT8):
        return "bias must be int32 (input scale x filter scale), is an 8/16-bit tensor"
    if b.type not in (INT32, 4):
        return ""
    want = inp[0] * wp[0]
    have = bp[0] if len(bp[0]) == len(want) else np.repeat(bp[0], len(want))
    if np.any(np.abs(have - want) > _BIAS_TOLERANCE * np.minimum(have, want)):
        return "bias scale != input scale x filter scale"
    return ""


# --- repairs -------------------------------------------------------------------------------------

def enforce(model: bytes) -> tuple[bytes, EnforceReport]:
    """(repaired model, what changed). Returns `model` itself when it already complies; raises
    QuantizationError (one line, naming the op) for what cannot be repaired."""
    m = te.load(model)
    filters = groups = changed = fixed = biases = 0
    for sg in m.subgraphs or []:
        filters += _symmetric_filters(m, sg)
        f, g, c = _share_scales(m, sg)
        fixed, groups, changed = fixed + f, groups + g, changed + c
        biases += _requantize_biases(m, sg)
    report = EnforceReport(filters, groups, changed, fixed, biases)
    if not report.changed:
        return model, report
    out = te.pack(m)
    left = violations(out)
    if left:
        v = left[0]
        raise QuantizationError(f"the quantized model breaks an int8 kernel requirement edgeq cannot repair: "
                                f"op {v} ({len(left)} op(s) in all); keep that op float with a --device "
                                "profile, or try --scheme dynamic")
    return out, report


def _symmetric_filters(m, sg) -> int:
    """Re-quantize constant filters with a non-zero zero point symmetric per output channel."""
    n = 0
    done: set[int] = set()
    for op_index, op in enumerate(sg.operators or []):
        name = te.op_name(m, op)
        if name not in FILTER_OPS:
            continue
        w_i, axis, _ = FILTER_OPS[name]
        ins = te.ints(op.inputs)
        if w_i >= len(ins) or ins[w_i] < 0 or ins[w_i] in done:
            continue
        t = sg.tensors[ins[w_i]]
        p = te.qparams(t)
        if t.type != INT8 or p is None or not np.any(p[1] != 0):
            continue
        q = te.constant(m, sg, ins[w_i])
        if q is None:
            raise QuantizationError(f"op #{op_index} {name}: its int8 filter is computed, not a constant, and has "
                                    f"zero point {int(p[1][p[1] != 0][0])} != 0 (the int8 kernels need 0); "
                                    f"keep {name} float with a --device profile, or try --scheme dynamic")
        qaxis = int(t.quantization.quantizedDimension) if len(p[0]) > 1 else None
        w = _dequantize(q, p[0], p[1], qaxis)
        red = tuple(a for a in range(w.ndim) if a != axis)
        amax = np.abs(w).max(axis=red) if w.ndim > 1 else np.abs(w)
        scale = np.where(amax > 0, amax / 127.0, 1.0)
        shape = [1] * w.ndim
        shape[axis] = -1
        wq = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        te.set_constant(m, sg, ins[w_i], wq, new_buffer=te.buffer_shared(m, t.buffer))
        _set_params(t, scale, np.zeros(len(scale), dtype=np.int64), axis)
        done.add(ins[w_i])
        n += 1
    return n


def _share_scales(m, sg) -> tuple[int, int, int]:
    """Give every group of tensors tied by same-scale ops one (scale, zero point): the union of their
    ranges, or the fixed output parameters of a LOGISTIC/SOFTMAX/TANH in the group.
    (fixed outputs set, groups merged, tensors changed)."""
    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for op in sg.operators or []:
        tied = _same_scale_tensors(m, sg, op)
        for t in tied[1:]:
            parent[find(t)] = find(tied[0])
    pinned: dict[int, tuple[float, int]] = {}  # tensor -> fixed params
    for op in sg.operators or []:
        fixed = FIXED_OUTPUT.get(te.op_name(m, op))
        if fixed and te.ints(op.outputs):
            t = te.ints(op.outputs)[0]
            want = fixed.get(sg.tensors[t].type)
            if want and _per_tensor(sg.tensors[t]) is not None:
                pinned[t] = want
    groups: dict[int, list[int]] = {}
    for t in set(parent) | set(pinned):
        groups.setdefault(find(t), []).append(t)
    n_fixed = n_groups = n_changed = 0
    for members in groups.values():
        params = {t: _per_tensor(sg.tensors[t]) for t in members}
        pins = {pinned[t] for t in members if t in pinned}
        if len(pins) > 1:
            raise QuantizationError(f"tensors {', '.join(te.tensor_name(sg.tensors[t]) for t in members[:3])} "
                                    "must share one scale but follow ops with different fixed output scales; "
                                    "keep one of those ops float with a --device profile")
        dtype = sg.tensors[members[0]].type
        if pins:
            target = pins.pop()
        elif len(set(params.values())) > 1:
            target = _union_params([params[t] for t in members], dtype)
        else:
            continue
        moved = [t for t in members if params[t] != target]
        if not moved:
            continue
        for t in moved:
            _requantize_tensor(m, sg, t, target)
        n_changed += len(moved)
        if any(t in pinned for t in members):
            n_fixed += sum(1 for t in moved if t in pinned)
        n_groups += 1
    return n_fixed, n_groups, n_changed


def _union_params(params: list[tuple[float, int]], dtype: int) -> tuple[float, int]:
    qmin, qmax = _RANGE[dtype]
    lo = min((qmin - z) * s for s, z in params)
    hi = max((qmax - z) * s for s, z in params)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU outputs)
    if dtype == INT16:  # int16 activations are symmetric
        return max(-lo, hi) / qmax, 0
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zp


def _requantize_tensor(m, sg, index: int, target: tuple[float, int]) -> None:
    t = sg.tensors[index]
    old = _per_tensor(t)
    data = te.constant(m, sg, index)
    if data is not None and old is not None:
        qmin, qmax = _RANGE[t.type]
        real = (data.astype(np.float64) - old[1]) * old[0]
        q = np.clip(np.round(real / target[0] + target[1]), qmin, qmax).astype(data.dtype)
        te.set_constant(m, sg, index, q, new_buffer=te.buffer_shared(m, t.buffer))
    _set_params(t, target[0], target[1])


def _requantize_biases(m, sg) -> int:
    """Make each int32 bias scale input_scale x filter_scale[c] (after filters or inputs moved)."""
    n = 0
    users: dict[int, int] = {}
    for op in sg.operators or []:
        name = te.op_name(m, op)
        if name in FILTER_OPS:
            ins = te.ints(op.inputs)
            b_i = FILTER_OPS[name][2]
            if b_i < len(ins) and ins[b_i] >= 0:
                users[ins[b_i]] = users.get(ins[b_i], 0) + 1
    for op in sg.operators or []:
        name = te.op_name(m, op)
        if name not in FILTER_OPS or not _bias_mismatch(sg, op, name):
            continue
        w_i, _, b_i = FILTER_OPS[name]
        ins = te.ints(op.inputs)
        bias_index = ins[b_i]
        b = sg.tensors[bias_index]
        data = te.constant(m, sg, bias_index)
        if data is None:
            continue
        bp = te.qparams(b)
        old = bp[0] if len(bp[0]) == data.size else np.repeat(bp[0], data.size)
        old_zp = bp[1] if len(bp[1]) == data.size else np.repeat(bp[1], data.size)
        real = (data.astype(np.float64).ravel() - old_zp) * old
        inp = _per_tensor(sg.tensors[ins[2] if name == "TRANSPOSE_CONV" else ins[0]])
        scale = inp[0] * te.qparams(sg.tensors[ins[w_i]])[0]
        wide = np.int64 if b.type == 4 or sg.tensors[ins[w_i]].type == INT16 else np.int32
        info = np.iinfo(wide)
        q = np.clip(np.round(real / scale), info.min, info.max).astype(wide)
        if users.get(bias_index, 0) > 1:  # shared by ops with other input scales: this op gets a copy
            bias_index = _clone_tensor(m, sg, bias_index)
            op.inputs = list(ins)
            op.inputs[b_i] = bias_index
            users[ins[b_i]] -= 1
        te.set_constant(m, sg, bias_index, q, new_buffer=te.buffer_shared(m, sg.tensors[bias_index].buffer))
        _set_params(sg.tensors[bias_index], scale, np.zeros(len(scale), dtype=np.int64), 0)
        n += 1
    return n


def _clone_tensor(m, sg, index: int) -> int:
    import copy
    t = copy.deepcopy(sg.tensors[index])
    t.name = (te.tensor_name(t) + "_edgeq").encode()
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return (q.astype(np.float64) - zp[0]) * scale[0]
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q.astype(np.float64) - zp.reshape(shape)) * scale.reshape(shape)
