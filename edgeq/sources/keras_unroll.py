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
original's on an input with padded steps.
"""

from __future__ import annotations

import numpy as np

RECURRENT = frozenset({"LSTM", "GRU", "SimpleRNN"})
MAX_STEPS = 512  # time steps: each is a copy of the cell's ops in the converted graph


def unrolled(model, trusted: bool = False) -> tuple[object, str]:
    """(the model with its recurrent layers unrolled, a note saying so), or (model, "") where it
    has none to unroll or cannot be rebuilt exactly. `trusted`: rebuilt the way it was loaded, its
    Lambda layers' code included (--trust-model)."""
    found = _to_unroll(model)
    if not found or any(getattr(layer, "stateful", False) or not _steps_ok(outer) for layer, outer in found):
        return model, ""
    layers = [layer for layer, _ in found]
    counted = []
    try:
        rebuilt = _rebuilt(model, lambda config: counted.append(_set_unroll(config)), trusted)
        n = counted[0]
        x = [_probe_input(t) for t in model.inputs]
        same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in
                   zip(_outputs(rebuilt, x), _outputs(model, x)))
    except Exception:  # noqa: BLE001 - a custom model Keras cannot rebuild: convert it as it is
        return model, ""
    if not n or not same:
        return model, ""
    kinds = ", ".join(sorted({type(la).__name__ for la in layers}))
    steps = max(_steps(outer) or 0 for _, outer in found)
    return rebuilt, (f"{n} recurrent layer(s) ({kinds}) converted unrolled over up to {steps} steps (unroll=True, "
                     "the same function; a copy of the cell's ops a step): their loop is a WHILE the LiteRT "
                     "quantizer cannot calibrate")


def at_shapes(model, shapes, trusted: bool = False):
    """The model rebuilt with its inputs declared at `shapes` (one per input, in order; same
    weights), where it has recurrent layers to unroll: an LSTM over None steps cannot be unrolled,
    and the --input-shape that fixes them pins a wrapper around it (its layers still see None).
    None where there is nothing to unroll or Keras cannot rebuild it."""
    if not _to_unroll(model):
        return None

    def declare(config):
        inputs = [la for la in config["layers"] if la.get("class_name") == "InputLayer"]
        order = config.get("input_layers")
        if order and isinstance(order[0], str):
            order = [order]
        names = [entry[0] for entry in order] if order else [la["config"]["name"] for la in inputs]
        by_name = {la["config"]["name"]: la for la in inputs}
        if len(names) != len(shapes) or any(n not in by_name for n in names):
            raise ValueError("the model's inputs and --input-shape differ")
        for name, shape in zip(names, shapes):
            by_name[name]["config"]["batch_shape"] = list(shape)

    try:
        return _rebuilt(model, declare, trusted)
    except Exception:  # noqa: BLE001 - a model Keras cannot rebuild: pinned by a wrapper as before
        return None


def _to_unroll(model) -> list:
    """(layer, where its steps are read) for each recurrent layer not unrolled yet."""
    return [(layer, outer) for layer, outer in _walk(model)
            if type(layer).__name__ in RECURRENT and not getattr(layer, "unroll", True)]


def _rebuilt(model, edit, trusted: bool):
    """The model rebuilt from its config after `edit(config)`, with its weights."""
    config = model.get_config()
    edit(config)
    with _safe_mode(not trusted):
        rebuilt = type(model).from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _probe_input(t) -> np.ndarray:
    """A sample to check the rebuilt model on: random values with the last quarter of the steps
    zero, so that a Masking layer or a mask_zero Embedding masks part of it (an int input gets
    token ids 1-2 there)."""
    shape = (1, *tuple(t.shape)[1:])
    rng = np.random.default_rng(0)
    x = rng.integers(1, 3, shape) if np.issubdtype(np.dtype(t.dtype), np.integer) else rng.normal(size=shape)
    if len(shape) >= 2 and shape[1]:
        x[:, shape[1] - shape[1] // 4:] = 0
    return x.astype(t.dtype)


def _safe_mode(safe: bool):
    """Keras' deserialization scope as load_model(safe_mode=...) set it, for this rebuild only (the
    public switch, keras.config.enable_unsafe_deserialization, is process-wide). Keras' private
    SafeModeScope; where it is gone, the default (safe) scope."""
    import contextlib

    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:
        return contextlib.nullcontext()
    return SafeModeScope(safe)


def _walk(model):
    """(layer, (the layer whose input it sees, its time axis there)): a Bidirectional's own GRUs have
    no input of their own; a TimeDistributed's layer steps over axis 2 of its input."""
    for layer in getattr(model, "layers", []):
        yield layer, (layer, 1)
        axis = 2 if type(layer).__name__ == "TimeDistributed" else 1
        for inner in ("layer", "forward_layer", "backward_layer"):  # Bidirectional, TimeDistributed
            if getattr(layer, inner, None) is not None:
                yield getattr(layer, inner), (layer, axis)
        if hasattr(layer, "layers"):
            yield from _walk(layer)


def _steps(outer) -> int | None:
    """The layer's number of time steps: its input's time axis (the first input where Keras lists
    the mask with it), None where unknown."""
    layer, axis = outer
    try:
        x = layer.input
        shape = tuple((x[0] if isinstance(x, (list, tuple)) else x).shape)
    except (AttributeError, ValueError, IndexError):  # a layer never called on a Keras input
        return None
    return shape[axis] if len(shape) > axis + 1 else None


def _steps_ok(outer) -> bool:
    """A fixed number of time steps, at most MAX_STEPS."""
    steps = _steps(outer)
    return steps is not None and 0 < steps <= MAX_STEPS


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
