"""Learned rounding (AdaRound, Nagel et al. 2020): per layer, learn whether each weight rounds up or down.

Rounding every weight to its nearest int8 level minimises each weight's own error, not the layer's
output error: errors of neighbouring weights add up. AdaRound learns, per weight, a soft choice
h(V) in [0, 1] between floor(W/s) and floor(W/s) + 1 that makes the int8 layer reproduce the float
layer's output on calibration data, with a regulariser that pushes every h to exactly 0 or 1 as its
exponent beta anneals from 20 to 2. Here:

- the layer's INPUT comes from the int8 model and its TARGET from the float model (AdaRound's
  asymmetric reconstruction: the rounding also compensates the error of the layers before it);
- layers are processed in graph order, one at a time: each re-runs the int8 model written so far, so
  it sees the inputs the rounded earlier layers really produce (learning several layers from one run
  let a layer compensate a shift its predecessor was fixing at the same time: MobileNetV2 broke);
- the float targets come from one run of the float model; a quarter of each layer's crops is held
  back, and a layer's new rounding is kept only if it reconstructs better there;
- the loss includes the fused activation (ReLU/ReLU6), and a per-channel bias offset is learned with
  the rounding (AdaQuant's bias term), folded into the int32 bias;
- per-channel weight scales and the activation ranges stay as the quantizer chose them; only int8
  weight values (and int32 biases) change, so the file keeps its ops, dtypes and size;
- data: random spatial crops of each layer's input map (SAME padding made explicit, so a VALID
  convolution of the crop gives exactly the model's outputs there), bounded per layer;
- TensorFlow (a core dependency) computes the layers; CPU only, time-bounded (`seconds`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import tflite_edit as te
from .errors import QuantizationError
from .weight_layers import WeightLayer, activate, capture, layer_forward, valid_pads, weight_layers

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)


@dataclass(frozen=True)
class RoundingConfig:
    seconds: float = 300.0  # whole-model budget (captures included; min_iterations may exceed it)
    max_iterations: int = 1000  # per layer
    min_iterations: int = 100
    batch: int = 32  # crops per step
    crop: int = 8  # output positions per crop side
    crops_per_sample: int = 2
    max_samples: int = 48
    reg_weight: float = 0.01
    learning_rate: float = 1e-2
    learn_bias: bool = True
    seed: int = 0


@dataclass(frozen=True)
class RoundedLayer:
    op_index: int
    op: str
    name: str
    weights: int
    flipped: int  # weights whose int8 value differs from round-to-nearest
    loss_nearest: float  # reconstruction MSE on held-back crops with round-to-nearest
    loss_learned: float  # ... with the learned rounding (kept only when lower)
    iterations: int

    def to_json(self) -> dict:
        return {"op_index": self.op_index, "op": self.op, "tensor": self.name, "weights": self.weights,
                "flipped": self.flipped, "loss_nearest": self.loss_nearest, "loss_learned": self.loss_learned,
                "iterations": self.iterations}


@dataclass(frozen=True)
class LearnedRounding:
    model: bytes
    layers: tuple[RoundedLayer, ...]
    samples: int
    seconds: float

    def to_json(self) -> dict:
        return {"samples": self.samples, "seconds": round(self.seconds, 1), "layers": len(self.layers),
                "weights_flipped": sum(r.flipped for r in self.layers),
                "weights": sum(r.weights for r in self.layers),
                "per_layer": [r.to_json() for r in self.layers]}


# --- Data: crops of each layer's input, int8 model and float model alike ---------------------------

class _Crops:
    """Where one layer's input is cut (fixed per sample, so the int8 and the float crops line up)."""

    def __init__(self, layer: WeightLayer, cfg: RoundingConfig, rng: np.random.Generator):
        self.layer, self.cfg, self.rng = layer, cfg, rng
        self._places: dict[int, list[tuple[int, int, int, int]]] = {}

    def cut(self, x: np.ndarray, sample: int) -> list[np.ndarray]:
        lay = self.layer
        if lay.kind == "FULLY_CONNECTED":
            return [x.reshape(-1, x.shape[-1]).copy()]  # x is the interpreter's buffer (capture)
        x = x.reshape(x.shape[-3:])
        ph, pw, oh, ow = valid_pads(lay, x.shape[0], x.shape[1])
        xp = np.pad(x, (ph, pw, (0, 0)))
        k = lay.float_weight.shape[1:3]
        if sample not in self._places:
            ch, cw = min(self.cfg.crop, oh), min(self.cfg.crop, ow)
            n = self.cfg.crops_per_sample if (ch, cw) != (oh, ow) else 1
            self._places[sample] = [(int(self.rng.integers(0, oh - ch + 1)), int(self.rng.integers(0, ow - cw + 1)),
                                     ch, cw) for _ in range(n)]
        out = []
        for i0, j0, ch, cw in self._places[sample]:
            rows = (ch - 1) * lay.stride[0] + (k[0] - 1) * lay.dilation[0] + 1
            cols = (cw - 1) * lay.stride[1] + (k[1] - 1) * lay.dilation[1] + 1
            r0, c0 = i0 * lay.stride[0], j0 * lay.stride[1]
            out.append(xp[r0:r0 + rows, c0:c0 + cols].copy())
        return out


def _crops_of(model: bytes, samples: Sequence[dict], wanted: dict[int, list[_Crops]]) -> dict[_Crops, list[np.ndarray]]:
    """One run of `model` over samples: for every tensor in wanted, its crops for each _Crops."""
    out: dict[_Crops, list[np.ndarray]] = {c: [] for cs in wanted.values() for c in cs}

    def visit(i, t, v):
        for c in wanted[t]:
            out[c].extend(c.cut(v, i))

    capture(model, samples, list(wanted), visit)
    return out


def _targets(float_model: bytes, layers: Sequence[WeightLayer], crops: dict[int, _Crops],
             samples: Sequence[dict]) -> dict[int, np.ndarray]:
    """op index -> the float layer's outputs (activation applied) on its crops, from one float run."""
    wanted: dict[int, list[_Crops]] = {}
    for lay in layers:
        wanted.setdefault(lay.float_input, []).append(crops[lay.op_index])
    got = _crops_of(float_model, samples, wanted)
    out = {}
    for lay in layers:
        xs = got[crops[lay.op_index]]
        if xs:
            bias = lay.float_bias if lay.float_bias is not None else np.zeros(lay.channels, np.float32)
            y = layer_forward(_valid(lay), _stack(lay, xs), lay.float_weight, bias)
            out[lay.op_index] = np.asarray(activate(lay, y)).astype(np.float16)  # halves the memory
    return out


# --- One layer --------------------------------------------------------------------------------------

def _stack(layer: WeightLayer, arrs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrs) if layer.kind == "FULLY_CONNECTED" else np.stack(arrs)


def learn_layer(layer: WeightLayer, x_q: np.ndarray, target: np.ndarray, w_int: np.ndarray, bias_float: np.ndarray,
                cfg: RoundingConfig, seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """(int8 weights, bias offset, loss nearest, loss learned, steps) for one layer, in about `seconds`
    (the step count follows from timing the first steps, within cfg.min/max_iterations).

    x_q: stacked VALID-ready input crops (or FC rows) from the int8 model; target: the float layer's
    output (activation applied) there; w_int: the quantizer's int8 weights (round-to-nearest);
    bias_float: the float bias (zeros if none)."""
    from .quiet import import_tf
    tf = import_tf()

    scale = layer.scale_shaped()
    w_over_s = layer.float_weight / scale
    floor = np.floor(w_over_s)
    rest = np.clip(w_over_s - floor, 1e-4, 1 - 1e-4)
    v0 = -np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0)  # h(v0) == rest: start at the float value
    conv_layer = _valid(layer)
    xq = tf.constant(x_q)
    tgt = tf.constant(target.astype(np.float32))
    floor_t, scale_t = tf.constant(floor, tf.float32), tf.constant(scale, tf.float32)
    bias_t = tf.constant(bias_float, tf.float32)
    v = tf.Variable(v0.astype(np.float32))
    db = tf.Variable(np.zeros_like(bias_float, np.float32))
    beta = tf.Variable(20.0)
    reg = tf.Variable(0.0)
    opt = tf.keras.optimizers.Adam(cfg.learning_rate)
    params = [v, db] if cfg.learn_bias else [v]
    # The last quarter of the crops (the last samples: crops are stacked in sample order) is kept out
    # of training; a layer's new rounding is kept only if it is better there too.
    total = int(x_q.shape[0])
    n = total - total // 4 if total >= 8 else total
    batch = min(cfg.batch, n)

    def soft():
        return tf.clip_by_value(tf.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def forward(x, w_levels, bias):
        return activate(layer, layer_forward(conv_layer, x, tf.clip_by_value(w_levels, -127.0, 127.0) * scale_t, bias))

    @tf.function(reduce_retracing=True)
    def step(idx):
        with tf.GradientTape() as tape:
            h = soft()
            y = forward(tf.gather(xq, idx), floor_t + h, bias_t + db)
            diff = tf.reshape(y - tf.gather(tgt, idx), [tf.shape(y)[0], -1])
            rec = tf.reduce_mean(tf.reduce_sum(diff * diff, axis=1))
            round_loss = tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
            loss = rec + reg * round_loss
        opt.apply_gradients(zip(tape.gradient(loss, params), params))
        return rec

    def mse(levels, bias):
        lo = n if n < total else 0  # validation part, or everything when too few crops to split
        out = []
        for i in range(lo, total, 256):
            j = min(i + 256, total)
            out.append(tf.reduce_mean(tf.square(forward(xq[i:j], levels, bias) - tgt[i:j])) * (j - i))
        return float(tf.add_n(out) / (total - lo))

    rng = np.random.default_rng(seed)
    # Time a few steps (the first traces the graph), then plan the schedule to fit `seconds`.
    for _ in range(3):
        step(tf.constant(rng.integers(0, n, batch)))
    t0 = time.monotonic()
    for _ in range(5):
        step(tf.constant(rng.integers(0, n, batch)))
    per_step = (time.monotonic() - t0) / 5
    iterations = int(np.clip(seconds / max(per_step, 1e-6), cfg.min_iterations, cfg.max_iterations))
    warm = int(0.2 * iterations)
    for it in range(iterations):
        if it >= warm:  # AdaRound: no regulariser for the first 20%, then beta 20 -> 2
            frac = (it - warm) / max(iterations - warm, 1)
            beta.assign(2.0 + 18.0 * (1.0 - frac))
            reg.assign(cfg.reg_weight)
        step(tf.constant(rng.integers(0, n, batch)))
    learned = floor + (v.numpy() >= 0).astype(np.float32)
    learned = np.clip(learned, -127, 127)
    offset = db.numpy() if cfg.learn_bias else np.zeros_like(bias_float)
    loss_near = mse(tf.constant(w_int.astype(np.float32)), bias_t)
    loss_learned = mse(tf.constant(learned), bias_t + offset)
    if loss_learned >= loss_near:  # never hand back a layer that reconstructs worse on held-back crops
        return w_int, np.zeros_like(bias_float), loss_near, loss_near, iterations
    return learned.astype(np.int8), offset, loss_near, loss_learned, iterations


def _valid(layer: WeightLayer) -> WeightLayer:
    """The layer as a VALID convolution (crops carry their padding)."""
    from dataclasses import replace
    return layer if layer.kind == "FULLY_CONNECTED" else replace(layer, padding="VALID")


# --- The model ----------------------------------------------------------------------------------------

def learn_rounding(quant_model: bytes, float_model: bytes, samples: Sequence[dict], *,
                   config: RoundingConfig = RoundingConfig(),
                   on_step: Callable[[str], None] | None = None) -> LearnedRounding:
    """The int8 model with learned rounding in every int8 CONV_2D / DEPTHWISE_CONV_2D /
    FULLY_CONNECTED (see module doc). samples are CALIBRATION samples; at most config.max_samples
    (evenly spread) are used. The time for optimisation is bounded by config.seconds."""
    from .range_search import spread
    from .quiet import import_tf

    t0 = time.monotonic()
    import_tf()  # quietly, before any layer is computed
    samples = spread(list(samples), config.max_samples)
    if not samples:
        raise QuantizationError("learned rounding needs calibration samples; pass --calib data")
    layers = weight_layers(quant_model, float_model)
    if not layers:
        return LearnedRounding(quant_model, (), len(samples), 0.0)
    m = te.load(quant_model)
    sg = m.subgraphs[0]
    rng = np.random.default_rng(config.seed)
    crops = {lay.op_index: _Crops(lay, config, rng) for lay in layers}
    if on_step:
        on_step("learned rounding: float targets")
    targets = _targets(float_model, layers, crops, samples)
    done: list[RoundedLayer] = []
    current = quant_model
    deadline = t0 + config.seconds
    for i, lay in enumerate(layers):
        if lay.op_index not in targets:
            continue
        # Inputs from the int8 model as rewritten so far (sequential: earlier layers' rounding included).
        c = crops[lay.op_index]
        xq = _stack(lay, _crops_of(current, samples, {lay.input: [c]})[c])
        # The time left, shared evenly by the layers left (each also pays ~2 s of capture and tracing).
        budget = max(deadline - time.monotonic(), 0.0) / (len(layers) - i)
        if on_step:
            on_step(f"learned rounding: layer {i + 1}/{len(layers)} ({lay.kind})")
        w_int = lay.quantized_weight(m)
        bias_f = lay.float_bias if lay.float_bias is not None else np.zeros(lay.channels, np.float32)
        learned, offset, l0, l1, iters = learn_layer(lay, xq, targets.pop(lay.op_index), w_int, bias_f, config,
                                                     budget, seed=config.seed + lay.op_index)
        flipped = int((learned != w_int).sum())
        if flipped or np.any(offset):
            _write(m, sg, lay, learned, offset)
            current = te.pack(m)
        done.append(RoundedLayer(lay.op_index, lay.kind, lay.name, int(w_int.size), flipped, l0, l1, iters))
    return LearnedRounding(current, tuple(done), len(samples), time.monotonic() - t0)


def _write(m, sg, lay: WeightLayer, w_int: np.ndarray, bias_offset: np.ndarray) -> None:
    te.set_constant(m, sg, lay.weight, w_int.astype(np.int8).reshape(lay.float_weight.shape))
    if lay.bias is None or not np.any(bias_offset):
        return
    bias = te.constant(m, sg, lay.bias)
    p = te.qparams(sg.tensors[lay.bias])
    if bias is None or bias.dtype != np.int32 or p is None:
        return
    b_scale = np.broadcast_to(p[0], bias.shape)
    new = bias.astype(np.int64) + np.round(bias_offset.astype(np.float64) / b_scale).astype(np.int64)
    te.set_constant(m, sg, lay.bias, np.clip(new, -2**31, 2**31 - 1).astype(np.int32))
