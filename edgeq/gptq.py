"""GPTQ rounding (Frantar et al. 2022) for the int4 weights the LiteRT quantizer wrote.

The quantizer rounds every int4 weight to its nearest level (scale = max|w| / 7 per output channel,
or per block of input values). Nearest per weight is not nearest per output: GPTQ keeps the same
scales and chooses the integers one input column at a time, pushing each column's rounding error
onto the columns not yet quantized, weighted by H = X^T X of the layer's inputs (the inverse
Hessian of the layer's squared output error). Here:

- every FULLY_CONNECTED whose weight is a constant int4 tensor (channelwise, or blockwise with a
  float16 scale per block) is paired with the float model's FC by output tensor name (the LiteRT
  quantizer keeps names), checked by weight shape; its float weights are GPTQ's starting point;
- H is accumulated from one run of the FLOAT model over the calibration samples (rows = tokens;
  rows whose `attention_mask` is 0 are left out when the sample has one of the right length:
  padding is most of a short sentence's 128 tokens and never reaches a pooled output: MiniLM
  all-int4 cosine 0.916 with padding rows, 0.921 without);
- columns go most-active first (act-order; the scales are fixed, so any order is valid), 1% of the
  mean diagonal damps H, integers are clipped to [-7, 7] (as the quantizer's; see QMIN), zero
  points stay 0;
- with a float32 bias in the file (dynamic int4: every FC with a bias), GPTQ works on the centred
  covariance C = H - n mu mu^T (mu: the mean input row) and the bias takes the mean's share,
  b - (Q - W) mu, so on the calibration rows the layer's error is exactly that of the centred
  inputs (MiniLM all-int4-b128, 256 calibration sentences, held-out cosine 0.9822 -> 0.9837);
  a static (int4x8) layer's int32 bias is tied to its scales and keeps H;
- a layer's new integers are kept only if its own output error on the calibration inputs,
  ||X (W - Q)^T + 1 d^T|| / ||X W^T|| (d: the bias change; computed from the undamped H or C),
  drops; scales, ops and dtypes do not change: only the packed nibbles (two per byte, low nibble
  first, as the quantizer packs them) and the bias values; the file is repacked by tflite_edit (a
  few KB smaller: the quantizer pads);
- optionally (GptqConfig.clip_grid) each channel's or block's scale first shrinks to the factor of
  the grid with the least rounding error weighted by diag(H) (max|w| / 7 wastes levels on one
  outlier weight); the file's scales then change too (same dtypes: float32 per channel, float16
  per block);
- int4 embedding tables (EMBEDDING_LOOKUP) have no H to trade errors in: each looked-up row is used
  as stored. With clip_grid their channel or block scales shrink by the same grid to the factor
  with the least plain squared error, integers rounded to nearest (MiniLM's 30522x384 word table
  at int4-b128 alone: relative error 0.118 -> 0.106, cosine to float 0.9972 -> 0.9977);
- a GptqCache carries H and each layer's result to the next call on another mix of the same float
  model (the budget loop's probes): a layer quantized alike is solved once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import tflite_edit as te
from .errors import QuantizationError

INT4 = 17  # schema TensorType.INT4
# -8 is an int4 value, but LiteRT 2.3's builtin dynamic int4 FULLY_CONNECTED (no XNNPACK) computes
# it wrong (measured: 10 weights at -8 in a 3-FC MLP made its output 24% off; XNNPACK was right).
# The quantizer's own rounding (scale max|w|/7) never writes -8 either.
QMIN, QMAX = -7, 7


@dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block: int = 128  # columns per lazy batch update (speed only: same result)
    act_order: bool = True
    centre: bool = True  # a float32 bias takes the mean's share, GPTQ the centred covariance (module doc)
    # Calibration samples used (evenly spread): all a user gives, up to this. H needs many more rows
    # than inputs (MiniLM's FFN-down has 1536; 64 sentences give ~2,000 token rows): all-int4-b128
    # MiniLM's held-out cosine with GPTQ from 64 / 128 / 256 / 640 sentences 0.9786 / 0.9813 /
    # 0.9822 / 0.9832 (one float run per sample for H: ~0.1 s each on MiniLM).
    max_samples: int = 1024
    mask_input: str | None = "attention_mask"  # rows where this input is 0 stay out of H
    seconds: float = 600.0  # whole run; layers left when it is spent keep nearest rounding
    # Scale search (off by default: the quantizer's scales stay): per channel or block, the scale
    # becomes a * scale for the a of this grid with the least diag(H)-weighted rounding error.
    clip_grid: tuple[float, ...] = ()


@dataclass(frozen=True)
class Int4Fc:
    """One FULLY_CONNECTED with a constant int4 weight, paired with its float op."""

    op_index: int
    name: str  # output tensor name
    weight: int  # tensor index in the quantized model
    float_input: int  # tensor index of the input activation in the float model (-1: a table)
    float_weight: np.ndarray  # [O, I] float32
    scales: np.ndarray  # [O, I] float32: each weight's scale (per channel or per block)
    block: int  # 0: per channel
    scale_tensor: int = -1  # blockwise: the tensor holding the [O, I / block] scales
    static: bool = False  # int8 activations (int4x8): the int32 bias's scale is tied to the weight's


# --- int4 in the file -------------------------------------------------------------------------------

def unpack_int4(data: np.ndarray, count: int) -> np.ndarray:
    """`count` signed int4 values from packed bytes (two per byte, low nibble first)."""
    data = np.asarray(data, dtype=np.uint8)
    nib = np.stack([data & 0x0F, data >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed int4 values (flattened, row-major) as packed bytes: the inverse of unpack_int4."""
    v = (np.asarray(values, dtype=np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)


def int4_values(m, sg, index: int) -> np.ndarray:
    """The int4 constant `index` as int8 values, shaped."""
    t = sg.tensors[index]
    shape = tuple(int(d) for d in t.shape)
    return unpack_int4(m.buffers[t.buffer].data, int(np.prod(shape))).reshape(shape)


def _scales(m, sg, t, shape: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """(each weight's scale as [O, I], block size or 0, blockwise scale tensor or -1) of int4 TensorT
    `t`; None if not symmetric."""
    q = t.quantization
    if q is None:
        return None
    details = q.details
    if details is not None and getattr(details, "blockSize", 0):  # BlockwiseQuantization
        block = int(details.blockSize)
        if getattr(details, "zeroPoints", -1) not in (-1, None):
            return None
        s = te.constant(m, sg, int(details.scales))
        if s is None or shape[1] % block or s.shape != (shape[0], shape[1] // block):
            return None
        return np.repeat(s.astype(np.float32), block, axis=1), block, int(details.scales)
    p = te.qparams(t)
    if p is None or np.any(p[1] != 0) or (len(p[0]) > 1 and int(q.quantizedDimension or 0) != 0):
        return None
    return np.broadcast_to(p[0].astype(np.float32).reshape(-1, 1), shape).copy(), 0, -1


def int4_fcs(quant_model: bytes, float_model: bytes, qm=None, fm=None) -> list[Int4Fc]:
    """The int4 FULLY_CONNECTEDs of quant_model with their float weights and float input tensor
    (qm, fm: the two models already loaded)."""
    qm = qm if qm is not None else te.load(quant_model)
    fm = fm if fm is not None else te.load(float_model)
    qsg = qm.subgraphs[0]
    # static: the input is not float32, so the activations are quantized statically (int4x8)
    return [Int4Fc(i, name, int(op.inputs[1]), int(fop.inputs[0]), fw, *sc,
                   static=qsg.tensors[int(op.inputs[0])].type != 0)
            for i, op, fop, name, fw, sc in _int4_weights(qm, fm, "FULLY_CONNECTED")]


def int4_tables(quant_model: bytes, float_model: bytes, qm=None, fm=None) -> list[Int4Fc]:
    """The int4 EMBEDDING_LOOKUP tables of quant_model with their float values ([rows, width] as an
    Int4Fc: float_input is -1, a table has no input activation)."""
    qm = qm if qm is not None else te.load(quant_model)
    fm = fm if fm is not None else te.load(float_model)
    return [Int4Fc(i, name, int(op.inputs[1]), -1, fw, *sc)
            for i, op, _, name, fw, sc in _int4_weights(qm, fm, "EMBEDDING_LOOKUP")]


def _int4_weights(qm, fm, kind: str):
    """(op index, op, float model's op, output name, float weight [O, I], scales as _scales gives them)
    for each `kind` op of quantized model qm with a constant 2-D int4 weight (input 1), paired with
    float model fm's op by output tensor name (the LiteRT quantizer keeps names), checked by shape."""
    from .weight_layers import _float_constant

    qsg, fsg = qm.subgraphs[0], fm.subgraphs[0]
    fprod = te.producers(fsg)
    float_ops = {te.tensor_name(fsg.tensors[op.outputs[0]]): op for op in fsg.operators if te.op_name(fm, op) == kind}
    for i, op in enumerate(qsg.operators):
        if te.op_name(qm, op) != kind or len(op.inputs) < 2:
            continue
        w = qsg.tensors[int(op.inputs[1])]
        if w.type != INT4 or w.shape is None or len(w.shape) != 2 or not _has_data(qm, w):
            continue
        shape = (int(w.shape[0]), int(w.shape[1]))
        name = te.tensor_name(qsg.tensors[op.outputs[0]])
        fop = float_ops.get(name)
        fw = None if fop is None else _float_constant(fm, fsg, int(fop.inputs[1]), fprod)
        sc = _scales(qm, qsg, w, shape)
        if fw is not None and fw.shape == shape and sc is not None:
            yield i, op, fop, name, fw, sc


def _has_data(m, t) -> bool:
    return t.buffer < len(m.buffers) and m.buffers[t.buffer].data is not None and len(m.buffers[t.buffer].data) > 0


# --- H = X^T X from the float model --------------------------------------------------------------

def hessians(float_model: bytes, samples: Sequence[dict], tensors: Sequence[int], mask_input: str | None = None
              ) -> tuple[dict[int, np.ndarray], dict[int, int], dict[int, np.ndarray]]:
    """tensor index -> sum over rows of x x^T (float64), the row count and the sum of the rows, from
    one float run."""
    from .weight_layers import capture

    hs: dict[int, np.ndarray] = {}
    rows: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}

    def visit(i, t, v):
        x = v.reshape(-1, v.shape[-1])
        mask = samples[i].get(mask_input) if mask_input else None
        if mask is not None and np.size(mask) == x.shape[0]:
            x = x[np.asarray(mask).reshape(-1) != 0]
        h = (x.T @ x).astype(np.float64)  # float32 product per sample, summed in float64
        hs[t] = hs[t] + h if t in hs else h
        rows[t] = rows.get(t, 0) + x.shape[0]
        sums[t] = sums.get(t, 0) + x.sum(axis=0, dtype=np.float64)

    capture(float_model, samples, list(dict.fromkeys(tensors)), visit)
    return hs, rows, sums


# --- GPTQ on one layer ---------------------------------------------------------------------------

def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray, h_error: np.ndarray | None = None) -> float:
    """||X (w - w_hat)^T|| / ||X w^T|| with H = X^T X (w: [O, I]); h_error: the covariance the
    error is measured with instead (the centred one when a bias takes the mean's share)."""
    d, w = (w - w_hat).astype(np.float64), w.astype(np.float64)
    he = h if h_error is None else h_error
    num, den = float(((d @ he) * d).sum()), float(((w @ h) * w).sum())  # (a 3-operand einsum skips BLAS)
    return float(np.sqrt(max(num, 0.0) / max(den, 1e-30)))


def gptq_layer(w: np.ndarray, scales: np.ndarray, h: np.ndarray, *, damp: float = 0.01, block: int = 128,
               act_order: bool = True) -> np.ndarray:
    """GPTQ integers in [QMIN, QMAX] for float weights w [O, I] with fixed per-weight scales [O, I]
    and H = X^T X [I, I]."""
    w = np.asarray(w, np.float64).copy()
    s = np.asarray(scales, np.float64)
    s = np.where(s == 0, 1.0, s)
    h = np.asarray(h, np.float64).copy()
    n = w.shape[1]
    dead = np.diag(h) == 0  # inputs that never vary from 0: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, s, h = w[:, perm], s[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    u = _inverse_cholesky_upper(h)
    # Column-major work (a column of w is a contiguous row of wt): the inner loop touches rows.
    wt, st = np.ascontiguousarray(w.T), np.ascontiguousarray(s.T)
    qt = np.zeros(wt.shape, np.int8)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = wt[i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            qj = np.clip(np.round(w1[j] / st[i1 + j]), QMIN, QMAX)
            qt[i1 + j] = qj
            e = (w1[j] - qj * st[i1 + j]) / u1[j, j]
            w1[j:] -= u1[j, j:, None] * e
            err1[j] = e
        wt[i2:] -= u[i1:i2, i2:].T @ err1
    q = qt.T
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def clip_scales(w: np.ndarray, scales: np.ndarray, block: int, h_diag: np.ndarray, grid: Sequence[float],
                dtype=np.float32) -> np.ndarray:
    """Per output channel (block 0) or per block: the scale a * s (a from grid, stored as dtype)
    with the least rounding error weighted by each input's mean square (h_diag); shape [O, groups]."""
    o, n = w.shape
    b = block or n
    wg = w.reshape(o, n // b, b).astype(np.float64)
    hg = np.asarray(h_diag, np.float64).reshape(1, n // b, b)
    base = scales[:, ::b].astype(np.float64)
    best, best_err = base.astype(dtype), np.full(base.shape, np.inf)
    for a in (1.0, *grid):
        sa = (base * a).astype(dtype)
        sd = np.where(sa == 0, 1.0, sa.astype(np.float64))[..., None]
        err = (hg * (wg - np.clip(np.round(wg / sd), QMIN, QMAX) * sd) ** 2).sum(axis=2)
        better = err < best_err
        best, best_err = np.where(better, sa, best), np.where(better, err, best_err)
    return best


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), adding damping until H factors."""
    eye = np.eye(h.shape[0])
    extra = 0.0
    for _ in range(8):
        try:
            hinv = np.linalg.inv(np.linalg.cholesky(h + extra * eye))  # L^-1, with H = L L^T
            return np.linalg.cholesky(hinv.T @ hinv).T  # H^-1 = L^-T L^-1
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))) + 1e-12)
    raise QuantizationError("GPTQ: a layer's input covariance cannot be factored; use more calibration samples")


# --- The model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GptqLayer:
    op_index: int
    tensor: str
    shape: tuple[int, int]
    block: int
    rows: int  # calibration rows (tokens) in H
    error_nearest: float  # relative output error on the calibration inputs, quantizer's rounding
    error_gptq: float
    kept: bool
    changed: int  # int4 values that differ from the quantizer's
    seconds: float
    bias_corrected: bool = False  # centred GPTQ, the bias taking the mean's share

    def to_json(self) -> dict:
        return {"op_index": self.op_index, "tensor": self.tensor, "shape": list(self.shape), "block": self.block,
                "rows": self.rows, "error_nearest": round(self.error_nearest, 6),
                "error_gptq": round(self.error_gptq, 6), "kept": self.kept, "changed": self.changed,
                "bias_corrected": self.bias_corrected, "seconds": round(self.seconds, 2)}


class GptqCache:
    """What gptq_int4 learnt about one float model and one set of calibration samples, for the next
    call on another quantization of the same model (the accuracy-budget loop requantizes a mix per
    probe): each input's H, and each layer's result by its weight name and the quantizer's integers.
    A call with another float model, sample count or config starts it afresh."""

    def __init__(self):
        self.key: tuple | None = None
        self.hessians: dict[int, np.ndarray] = {}
        self.rows: dict[int, int] = {}
        self.sums: dict[int, np.ndarray] = {}
        self.results: dict[tuple, tuple] = {}

    def use(self, key: tuple) -> None:
        if key != self.key:
            self.key, self.hessians, self.rows, self.sums, self.results = key, {}, {}, {}, {}


def gptq_int4(quantized: bytes, float_model: bytes, samples: Sequence[dict], config: GptqConfig = GptqConfig(),
              on_step: Callable[[str], None] | None = None, cache: GptqCache | None = None) -> tuple[bytes, dict]:
    """`quantized` with GPTQ-rounded int4 weights in every int4 FULLY_CONNECTED (see the module doc),
    and a report. samples: CALIBRATION samples (input dicts of the float model's signature)."""
    import zlib

    from .range_search import spread

    t0 = time.monotonic()
    samples = spread(list(samples), config.max_samples)
    if not samples:
        raise QuantizationError("GPTQ needs calibration samples; pass --calib data")
    qm = te.load(quantized)
    sg = qm.subgraphs[0]
    fm = te.load(float_model)  # once for the FCs and the tables
    layers = int4_fcs(quantized, float_model, qm, fm)
    report: dict = {"samples": len(samples), "layers": [], "skipped": []}
    cache = cache if cache is not None else GptqCache()
    cache.use((len(float_model), zlib.crc32(float_model), len(samples), config))
    changed_any = False
    if config.clip_grid:
        report["tables"] = [_clip_table(qm, sg, tab, config.clip_grid, cache)
                            for tab in int4_tables(quantized, float_model, qm, fm)]
        changed_any = any(r["changed"] for r in report["tables"])
    if not layers:
        report["seconds"] = round(time.monotonic() - t0, 2)
        return (te.pack(qm) if changed_any else quantized), report
    missing = [lay.float_input for lay in layers if lay.float_input not in cache.hessians]
    if missing:
        if on_step:
            on_step(f"GPTQ: inputs of {len(layers)} int4 FULLY_CONNECTED layers from the float model")
        hs, rows, sums = hessians(float_model, samples, missing, config.mask_input)
        cache.hessians.update(hs)
        cache.rows.update(rows)
        cache.sums.update(sums)
    deadline = t0 + config.seconds
    readers = te.consumers(sg)
    for k, lay in enumerate(layers):
        h = cache.hessians.get(lay.float_input)
        if h is None or h.shape[0] != lay.float_weight.shape[1] or not cache.rows.get(lay.float_input):
            report["skipped"].append({"op_index": lay.op_index, "tensor": lay.name, "reason": "no input values"})
            continue
        near = int4_values(qm, sg, lay.weight)
        bias = None if lay.static or not config.centre else _float_bias(qm, sg, lay, readers)
        mean = cache.sums[lay.float_input] / cache.rows[lay.float_input] if bias is not None else None
        key = (lay.name, lay.block, zlib.crc32(near.tobytes()), zlib.crc32(lay.scales.tobytes()), bias is not None)
        t1 = time.monotonic()
        if key not in cache.results:
            if t1 > deadline:
                report["skipped"].append({"op_index": lay.op_index, "tensor": lay.name, "reason": "time"})
                continue
            if on_step:
                on_step(f"GPTQ: layer {k + 1}/{len(layers)} {lay.name} {lay.float_weight.shape}")
            cache.results[key] = _solve(lay, near, h, config, mean, cache.rows[lay.float_input])
        new, groups, shift, e0, e1 = cache.results[key]
        kept = e1 < e0
        changed = int((new != near).sum())
        if kept and changed:
            _write(qm, sg, lay.weight, new)
            if groups is not None:
                _write_scales(qm, sg, lay, groups)
            if shift is not None:
                index, b = bias
                te.set_constant(qm, sg, index, (b - shift).astype(np.float32),
                                new_buffer=te.buffer_shared(qm, sg.tensors[index].buffer))
            changed_any = True
        report["layers"].append(GptqLayer(lay.op_index, lay.name, tuple(lay.float_weight.shape), lay.block,
                                          cache.rows[lay.float_input], e0, e1, kept, changed if kept else 0,
                                          time.monotonic() - t1, kept and shift is not None).to_json())
    report["seconds"] = round(time.monotonic() - t0, 2)
    return (te.pack(qm) if changed_any else quantized), report


def _solve(lay: Int4Fc, near: np.ndarray, h: np.ndarray, config: GptqConfig, mean: np.ndarray | None = None,
           rows: int = 0):
    """(GPTQ integers, new scales per channel/block or None, the bias change or None, error nearest,
    error GPTQ) of one layer; with `mean` (the mean input row over `rows` rows) GPTQ is solved on
    the centred covariance and the bias takes (Q - W) mean."""
    scales, groups = lay.scales, None
    c = h if mean is None else h - rows * np.outer(mean, mean)
    if config.clip_grid and not lay.static:  # a static layer's bias was quantized with these scales
        groups = clip_scales(lay.float_weight, lay.scales, lay.block, np.diag(c), config.clip_grid,
                             np.float16 if lay.block else np.float32)
        scales = np.repeat(groups.astype(np.float32), lay.block or lay.scales.shape[1], axis=1)
    new = gptq_layer(lay.float_weight, scales, c, damp=config.damp, block=config.block, act_order=config.act_order)
    shift = None if mean is None else (new * scales).astype(np.float64) @ mean - lay.float_weight.astype(np.float64) @ mean
    return (new, groups, shift, output_error(lay.float_weight, near * lay.scales, h),
            output_error(lay.float_weight, new * scales, h, c))


def _float_bias(m, sg, lay: Int4Fc, readers: dict[int, list[int]]) -> tuple[int, np.ndarray] | None:
    """(tensor index, values) of the FC's float32 constant bias, or None (also when another op reads
    it; readers: te.consumers(sg))."""
    ins = te.ints(sg.operators[lay.op_index].inputs)
    if len(ins) < 3 or ins[2] < 0 or sg.tensors[ins[2]].type != 0 or len(readers.get(ins[2], [])) > 1:
        return None
    b = te.constant(m, sg, ins[2])
    return None if b is None or b.shape != (lay.float_weight.shape[0],) else (ins[2], b)


def _clip_table(m, sg, tab: Int4Fc, grid: Sequence[float], cache: GptqCache) -> dict:
    """Shrink an int4 table's scales to the grid factor with the least squared error (nearest
    rounding), written into the model when the error drops; the table's report row."""
    import zlib

    t1 = time.monotonic()
    near = int4_values(m, sg, tab.weight)
    key = ("table", tab.name, tab.block, zlib.crc32(near.tobytes()), zlib.crc32(tab.scales.tobytes()))
    if key not in cache.results:
        groups = clip_scales(tab.float_weight, tab.scales, tab.block, np.ones(tab.float_weight.shape[1]), grid,
                             np.float16 if tab.block else np.float32)
        scales = np.repeat(groups.astype(np.float32), tab.block or tab.scales.shape[1], axis=1)
        new = np.clip(np.round(tab.float_weight / np.where(scales == 0, 1.0, scales)), QMIN, QMAX).astype(np.int8)
        w = tab.float_weight.astype(np.float64)
        norm = max(float(np.linalg.norm(w)), 1e-30)
        cache.results[key] = (new, groups, None, float(np.linalg.norm(near * tab.scales.astype(np.float64) - w)) / norm,
                              float(np.linalg.norm(new * scales.astype(np.float64) - w)) / norm)
    new, groups, _, e0, e1 = cache.results[key]
    changed = int((new != near).sum()) if e1 < e0 else 0
    if changed:
        _write(m, sg, tab.weight, new)
        _write_scales(m, sg, tab, groups)
    return {"op_index": tab.op_index, "tensor": tab.name, "shape": list(tab.float_weight.shape), "block": tab.block,
            "error_nearest": round(e0, 6), "error_clipped": round(e1, 6), "changed": changed,
            "seconds": round(time.monotonic() - t1, 2)}


def _write_scales(m, sg, lay: Int4Fc, groups: np.ndarray) -> None:
    if lay.block:
        te.set_constant(m, sg, lay.scale_tensor, groups.astype(np.float16),
                        new_buffer=te.buffer_shared(m, sg.tensors[lay.scale_tensor].buffer))
    else:
        sg.tensors[lay.weight].quantization.scale = groups[:, 0].astype(np.float32)


def _write(m, sg, index: int, values: np.ndarray) -> None:
    t = sg.tensors[index]
    if te.buffer_shared(m, t.buffer):  # another tensor reads these bytes: give this one its own
        m.buffers.append(te.schema().BufferT())
        t.buffer = len(m.buffers) - 1
    m.buffers[t.buffer].data = pack_int4(values)
