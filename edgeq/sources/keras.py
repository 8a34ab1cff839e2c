"""Keras (.keras/.h5) and SavedModel sources, converted with the TFLite converter."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError, first_line
from ..signature import ensure_signature, signature_specs
from ..quiet import quiet_native
from ..files import sha256_file
from . import SourceModel


def _tf():
    from ..quiet import import_tf
    return import_tf()


def _float_tflite(make_converter, path: Path) -> bytes:
    try:
        with quiet_native():
            return bytes(make_converter().convert())
    except Exception as e:  # the converter raises ConverterError, ValueError, ... with long logs
        raise ModelFormatError(f"{path}: the TFLite converter could not convert this model: "
                               f"{first_line(e)}") from None


def load_keras(path: Path) -> SourceModel:
    tf = _tf()
    try:
        with quiet_native():
            model = tf.keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises ValueError/OSError/zipfile errors for bad files
        raise ModelFormatError(f"{path}: not a loadable Keras model ({first_line(e, 160)}); "
                               "expected a .keras or .h5 file saved by model.save()") from None

    def make_converter():
        return tf.lite.TFLiteConverter.from_keras_model(model)

    float_model = _float_tflite(make_converter, path)
    ins, outs = signature_specs(float_model)
    return SourceModel("keras", path, sha256_file(path), float_model, ins, outs, make_converter)


def load_saved_model(path: Path) -> SourceModel:
    tf = _tf()

    def make_converter():
        return tf.lite.TFLiteConverter.from_saved_model(str(path))

    try:
        make_converter()
    except Exception as e:  # corrupt saved_model.pb, missing variables, objects TF 2 cannot restore
        return _saved_model_graph(tf, path, first_line(e, 160))
    float_model = _float_tflite(make_converter, path)
    ins, outs = signature_specs(float_model)
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, make_converter)


def _saved_model_graph(tf, path: Path, why: str) -> SourceModel:
    """TF 2's object loader fails on some SavedModels that still hold a valid serving graph (Keras 2
    optimizer slots saved with the model: "'_UserObject' object has no attribute 'add_slot'"). The
    TF1 graph loader reads only the serving signature's graph and variables, so convert from that;
    its file has no SignatureDef (one is added) and, lacking a TF2 converter to re-run, the float
    .tflite is quantized by the LiteRT quantizer like any float .tflite source."""
    def make_v1():
        return tf.compat.v1.lite.TFLiteConverter.from_saved_model(str(path))

    try:
        with quiet_native():
            make_v1()
    except Exception:  # neither loader: report the TF 2 loader's reason, the usual one
        raise ModelFormatError(f"{path}: not a loadable SavedModel ({why})") from None
    float_model, _ = ensure_signature(_float_tflite(make_v1, path))
    ins, outs = signature_specs(float_model)
    note = (f"TF 2 could not restore this SavedModel's objects ({why}); edgeq converted its serving "
            "graph with the TF1 loader and quantizes it with the LiteRT quantizer")
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, None,
                       notes=(note,))
