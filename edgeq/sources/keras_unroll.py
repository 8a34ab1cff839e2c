"""Keras recurrent layers (LSTM, GRU, SimpleRNN) rebuilt with unroll=True before converting.

A Keras 3 LSTM runs its time steps in a loop: with a dynamic batch the TFLite converter cannot
lower it ("'tf.TensorListReserve' op requires element_shape to be static"), and at batch 1 it
writes a WHILE loop the LiteRT quantizer cannot calibrate (it reads no tensor inside it). Unrolled,
the same cell is written once per time step with the same weights: the same function, in ops both
quantize. network-intrusion-detection's Conv1D + LSTM(100) over 76 steps was refused twice; rebuilt
so, edgeq's int8 kept 89 of 96 decisions (the bare converter, unrolled by hand, 66).

Only where it is exact and bounded: a model Keras rebuilds from its config (Sequential or
functional), every unrolled layer not stateful and over a fixed number of steps (at most
MAX_STEPS: each step is a copy of the cell's ops), and the rebuilt model's outputs equal to the
original's on a random input.
"""

from __future__ import annotations

import numpy as np

RECURRENT = frozenset({"LSTM", "GRU", "SimpleRNN"})
MAX_STEPS = 512  # time steps: each is a copy of the cell's ops in the converted graph


def unrolled(tf, model) -> tuple[object, str]:
    """(the model with its recurrent layers unrolled, a note saying so), or (model, "") where it
    has none to unroll or cannot be rebuilt exactly."""
    found = [(layer, outer) for layer, outer in _walk(model) if type(layer).__name__ in RECURRENT
             and not getattr(layer, "unroll", True)]
    if not found or any(getattr(layer, "stateful", False) or not _steps_ok(outer) for layer, outer in found):
        return model, ""
    layers = [layer for layer, _ in found]
    try:
        config = model.get_config()
        n = _set_unroll(config)
        rebuilt = type(model).from_config(config)
        rebuilt.set_weights(model.get_weights())
        x = [np.random.default_rng(0).normal(size=(1, *tuple(t.shape)[1:])).astype(t.dtype)
             for t in model.inputs]
        same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in
                   zip(_outputs(rebuilt, x), _outputs(model, x)))
    except Exception:  # noqa: BLE001 - a custom model Keras cannot rebuild: convert it as it is
        return model, ""
    if not n or not same:
        return model, ""
    kinds = ", ".join(sorted({type(la).__name__ for la in layers}))
    return rebuilt, (f"{n} recurrent layer(s) ({kinds}) converted unrolled (unroll=True, the same function): "
                     "their loop is a WHILE the LiteRT quantizer cannot calibrate")


def _walk(model):
    """(layer, the layer whose input it sees): a Bidirectional's own GRUs have no input of their own."""
    for layer in getattr(model, "layers", []):
        yield layer, layer
        for inner in ("layer", "forward_layer", "backward_layer"):  # Bidirectional, TimeDistributed
            if getattr(layer, inner, None) is not None:
                yield getattr(layer, inner), layer
        if hasattr(layer, "layers"):
            yield from _walk(layer)


def _steps_ok(layer) -> bool:
    """A fixed number of time steps, at most MAX_STEPS (axis 1 of the layer's input)."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):  # a layer never called on a Keras input
        return False
    return len(shape) >= 3 and shape[1] is not None and 0 < shape[1] <= MAX_STEPS


def _set_unroll(config) -> int:
    """Set unroll=True on every recurrent layer in a Keras config (nested dicts and lists); how many."""
    n = 0
    if isinstance(config, dict):
        if config.get("class_name") in RECURRENT and isinstance(config.get("config"), dict) \
                and config["config"].get("unroll") is False:
            config["config"]["unroll"] = True
            n += 1
        for value in config.values():
            n += _set_unroll(value)
    elif isinstance(config, list):
        n += sum(_set_unroll(v) for v in config)
    return n


def _outputs(model, x) -> list:
    out = model(x if len(x) > 1 else x[0], training=False)
    out = out if isinstance(out, (list, tuple)) else list(out.values()) if isinstance(out, dict) else [out]
    return [np.asarray(o) for o in out]
