"""The weight layers of an int8 model next to their float weights, their inputs, and their math.

Bias correction, learned rounding and equalization work layer by layer on CONV_2D /
DEPTHWISE_CONV_2D / FULLY_CONNECTED: `weight_layers` pairs each int8 layer of the quantized model
with its float op (by output name, else by position and weight shape), `capture` runs a model and
hands over the tensors they need (int8 values dequantized), and `layer_forward` / `activate` compute
a layer in TensorFlow (lazily imported) with any weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import tflite_edit as te

WEIGHT_LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}
INT4 = 17  # schema TensorType.INT4
_INPUT_BIAS = {"TRANSPOSE_CONV": (2, 3)}  # (input, bias) operand; others (0, 2). Weights are operand 1.


@dataclass(frozen=True, eq=False)
class WeightLayer:
    """One int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED of a quantized model (subgraph 0) and the
    float weights it was quantized from."""

    op_index: int
    kind: str
    name: str  # output tensor name
    input: int  # tensor indices in the quantized model
    weight: int
    bias: int | None
    output: int
    float_input: int  # the same activation in the float model
    float_weight: np.ndarray  # float32, TFLite layout ([O,KH,KW,I], [1,KH,KW,C*M], [O,I])
    float_bias: np.ndarray | None
    weight_scale: np.ndarray  # per output channel (broadcast when per-tensor)
    input_scale: float
    input_zero_point: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    activation: str = "NONE"
    multiplier: int = 1

    @property
    def channels(self) -> int:
        return int(self.float_weight.shape[-1] if self.kind == "DEPTHWISE_CONV_2D" else self.float_weight.shape[0])

    def quantized_weight(self, model) -> np.ndarray:
        """The int8 weights as stored in `model` (a tflite_edit ModelT)."""
        return te.constant(model, model.subgraphs[0], self.weight)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return q.astype(np.float32) * self.scale_shaped()

    def scale_shaped(self) -> np.ndarray:
        """weight_scale broadcastable against the weight tensor (channel axis last for depthwise)."""
        if self.kind == "DEPTHWISE_CONV_2D":
            return self.weight_scale.reshape(1, 1, 1, -1).astype(np.float32)
        return self.weight_scale.reshape((-1,) + (1,) * (self.float_weight.ndim - 1)).astype(np.float32)


def valid_pads(layer: WeightLayer, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """(pad rows, pad cols, output height, output width) turning the layer into a VALID convolution."""
    k = layer.float_weight.shape[1:3]
    eff = [(k[i] - 1) * layer.dilation[i] + 1 for i in range(2)]
    out, pads = [], []
    for i, n in enumerate((h, w)):
        s = layer.stride[i]
        if layer.padding == "SAME":
            o = -(-n // s)
            total = max((o - 1) * s + eff[i] - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            o = (n - eff[i]) // s + 1
            pads.append((0, 0))
        out.append(o)
    return pads[0], pads[1], out[0], out[1]


def mixes_channels(kind: str, weight_shape, input_channels) -> bool:
    """Whether a CONV_2D / DEPTHWISE_CONV_2D is not what the steps assume: a CONV_2D dense over its
    input channels, a depthwise layer whose output channel c is input channel c. Both hold only when
    the weight's last dimension is the input's channel count; otherwise it is a grouped convolution
    (filters that see input_channels / groups channels: Keras 3 writes ConvNeXt's 7x7 depthwise, ResNeXt
    and RegNet their grouped convolutions so) or a depthwise layer with a channel multiplier."""
    if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D") or input_channels is None:
        return False
    return int(weight_shape[-1]) != int(input_channels)


def quant_params(t) -> tuple[np.ndarray, np.ndarray]:
    """(scales as float32, zero points) of TensorT `t`; both empty when it is not quantized."""
    p = te.qparams(t)
    if p is None:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return p[0].astype(np.float32), p[1]


def _float_constant(m, sg, index: int, producers: dict[int, int]) -> np.ndarray | None:
    """A float constant, also behind a DEQUANTIZE of an fp16 constant (how fp16 .tflite files store weights)."""
    value = te.constant(m, sg, index)
    if value is None and index in producers:
        op = sg.operators[producers[index]]
        if te.op_name(m, op) == "DEQUANTIZE":
            value = te.constant(m, sg, int(op.inputs[0]))
    if value is None or value.dtype.kind != "f":
        return None
    return value.astype(np.float32)


def _options(m, op, kind: str) -> dict:
    o = op.builtinOptions
    if kind == "FULLY_CONNECTED" or o is None:
        return {"activation": _ACTIVATIONS.get(getattr(o, "fusedActivationFunction", 0), "OTHER")}
    return {"stride": (int(o.strideH), int(o.strideW)),
            "dilation": (int(getattr(o, "dilationHFactor", 1) or 1), int(getattr(o, "dilationWFactor", 1) or 1)),
            "padding": "SAME" if o.padding == 0 else "VALID",
            "activation": _ACTIVATIONS.get(o.fusedActivationFunction, "OTHER"),
            "multiplier": int(getattr(o, "depthMultiplier", 1) or 1)}


def weight_layers(quant_model: bytes, float_model: bytes, *, kinds: Sequence[str] = WEIGHT_LAYER_OPS,
                  int16_inputs: bool = False, int4_weights: bool = False) -> list[WeightLayer]:
    """The int8 weight layers of quant_model, each paired with its float op in float_model: by output
    tensor name (the LiteRT quantizer keeps names), else by position among ops of the same kind and
    weight shape (the TFLite converter renames some). bias_overflow, which only rescales weights and
    biases, also takes TRANSPOSE_CONV (in `kinds`), int16 inputs (int16x8) and int4 weights (int4x8:
    quantized_weight is then None; gptq.int4_values reads them)."""
    in_types, w_types = (9, 7) if int16_inputs else (9,), (9, INT4) if int4_weights else (9,)
    qm, fm = te.load(quant_model), te.load(float_model)
    qsg, fsg = qm.subgraphs[0], fm.subgraphs[0]
    fprod = te.producers(fsg)

    def ops_of(m, sg):
        return [(i, op, te.op_name(m, op)) for i, op in enumerate(sg.operators)
                if te.op_name(m, op) in kinds]

    fops = ops_of(fm, fsg)
    by_name = {te.tensor_name(fsg.tensors[op.outputs[0]]): (i, op) for i, op, _ in fops}
    layers = []
    used: set[int] = set()
    for qi, op, kind in ops_of(qm, qsg):
        ins = [int(t) for t in op.inputs]
        w = qsg.tensors[ins[1]]
        if w.type not in w_types:  # int8 weights (hybrid/float layers have nothing to correct here)
            continue
        xi, bi = _INPUT_BIAS.get(kind, (0, 2))
        x = qsg.tensors[ins[xi]]
        in_scale, in_zp = quant_params(x)
        if x.type not in in_types or len(in_scale) != 1:
            continue
        name = te.tensor_name(qsg.tensors[op.outputs[0]])
        shape = tuple(int(d) for d in w.shape)
        hit = by_name.get(name)
        if hit is None or hit[0] in used:
            hit = next(((i, fo) for i, fo, k in fops if k == kind and i not in used
                        and tuple(int(d) for d in fsg.tensors[fo.inputs[1]].shape) == shape), None)
        if hit is None:
            continue
        fi, fop = hit
        fw = _float_constant(fm, fsg, int(fop.inputs[1]), fprod)
        if fw is None or fw.shape != shape:
            continue
        cin = int(x.shape[-1]) if x.shape is not None and len(x.shape) else None
        if kind == "CONV_2D" and mixes_channels(kind, shape, cin):
            # A grouped convolution keeps the quantizer's weights: weight rounding's input moments
            # over all input channels would be wrong (for ConvNeXt-T, 37632^2 float64 values; the run
            # was killed at 24 GB). A depthwise layer with a multiplier is handled per channel.
            continue
        fb = (_float_constant(fm, fsg, int(fop.inputs[bi]), fprod)
              if len(fop.inputs) > bi and fop.inputs[bi] >= 0 else None)
        w_scale, _ = quant_params(w)
        channels = shape[-1] if kind == "DEPTHWISE_CONV_2D" else shape[0]
        if w.type == INT4 and len(w_scale) not in (1, channels):  # blockwise int4: scales in another tensor
            continue
        used.add(fi)
        bias = ins[bi] if len(ins) > bi and ins[bi] >= 0 else None
        layers.append(WeightLayer(
            qi, kind, name, ins[xi], ins[1], bias, int(op.outputs[0]), int(fop.inputs[xi]), fw, fb,
            np.broadcast_to(w_scale, (channels,)).astype(np.float32).copy(), float(in_scale[0]), int(in_zp[0]),
            **_options(qm, op, kind)))
    return layers


def capture(model: bytes, samples: Sequence[dict], tensors: Sequence[int],
            visit: Callable[[int, int, np.ndarray], None], signature_key: str | None = None, *,
            dequantize: bool = True) -> dict[int, tuple]:
    """Run `model` on every sample and call visit(sample number, tensor index, value as float32) for
    each wanted tensor of subgraph 0 (int8 values dequantized; with dequantize=False as stored, for a
    caller that reduces them first). A value not converted (float, or int8 with dequantize=False) is
    a view of the interpreter's buffer, valid during the call: visit copies what it keeps. Returns
    {tensor index: (scale, zero point)}."""
    from ai_edge_litert.interpreter import Interpreter

    from .errors import first_line
    from .fidelity import ModelRunError, quantize_input
    from .quiet import quiet_native
    from .tflite_edit import schema

    # Tensors that are the model's outputs (a cut model's) are read without keeping every tensor,
    # which lets XNNPACK run it (sequential rounding's int8 runs: ~20 % faster)
    outputs = set(int(t) for t in schema().Model.GetRootAs(model, 0).Subgraphs(0).OutputsAsNumpy())
    with quiet_native():  # preserve_all_tensors warns that it is a debugging aid: it is used as one
        interp = Interpreter(model_content=model, experimental_preserve_all_tensors=not set(tensors) <= outputs,
                             num_threads=2)
        keys = list(interp.get_signature_list())
        ins = interp.get_signature_runner(signature_key if signature_key in keys else keys[0]).get_input_details()
    # The interpreter itself, not the signature runner: that re-allocates on every call and copies
    # every output (a sequential rounding's cut model has one per layer); only the wanted tensors
    # are read here (sequential rounding of MobileNetV2: 2.9 s -> 1.3 s of captures).
    quant = {t: interp._get_tensor_details(t, 0)["quantization"] for t in tensors}
    shapes = None
    with quiet_native():
        for i, s in enumerate(samples):
            feed = {d["index"]: quantize_input(np.asarray(s[n]), d) if np.asarray(s[n]).dtype.kind == "f"
                    else np.asarray(s[n]) for n, d in ins.items()}
            try:  # XNNPACK refusing a node at prepare, a kernel refusing an input: one line, not a traceback
                if shapes != (now := {k: v.shape for k, v in feed.items()}):
                    for k, shape in now.items():
                        interp.resize_tensor_input(k, shape)
                    interp.allocate_tensors()
                    shapes = now
                for k, v in feed.items():
                    interp.set_tensor(k, v)
                interp.invoke()
            except RuntimeError as e:
                raise ModelRunError(f"LiteRT could not run the model on sample {i + 1}: {first_line(e)}") from None
            for t in tensors:
                v = interp.tensor(t)()  # a view, valid until the next run: visit copies what it keeps
                scale, zp = quant[t]
                if not dequantize:
                    visit(i, t, v)
                    continue
                if v.dtype.kind in "iu" and scale:
                    v = (v.astype(np.float32) - zp) * scale
                visit(i, t, v.astype(np.float32, copy=False))
            v = None  # no view of the interpreter's buffers outlives the run (invoke() refuses to run then)
    return quant


def layer_forward(layer: WeightLayer, x, w, bias=None):
    """The layer (without its fused activation) on input x (NHWC / [N, I]) with weights w in TFLite
    layout, in TensorFlow (also inside a GradientTape or tf.function; callers import TF quietly first)."""
    import tensorflow as tf

    if layer.kind == "FULLY_CONNECTED":
        y = tf.matmul(tf.reshape(x, [-1, w.shape[-1]]), w, transpose_b=True)
    elif layer.kind == "CONV_2D":
        y = tf.nn.conv2d(x, tf.transpose(w, [1, 2, 3, 0]), (1,) + layer.stride + (1,), layer.padding,
                         dilations=(1,) + layer.dilation + (1,))
    else:
        kh, kw, c = int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
        cin = int(x.shape[-1])  # the multiplier from shapes: some writers leave depthMultiplier at 0
        y = tf.nn.depthwise_conv2d(x, tf.reshape(w, [kh, kw, cin, c // cin]),
                                   (1,) + layer.stride + (1,), layer.padding, dilations=layer.dilation)
    return y if bias is None else y + bias


def activate(layer: WeightLayer, y):
    import tensorflow as tf
    if layer.activation == "RELU":
        return tf.nn.relu(y)
    if layer.activation == "RELU6":
        return tf.clip_by_value(y, 0.0, 6.0)
    if layer.activation == "RELU_N1_TO_1":
        return tf.clip_by_value(y, -1.0, 1.0)
    return y
