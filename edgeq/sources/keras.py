"""Keras (.keras/.h5) and SavedModel sources, converted with the TFLite converter."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError, first_line
from ..signature import signature_specs
from ..tfimport import quiet_native
from ..files import sha256_file
from . import SourceModel


def _tf():
    from ..tfimport import import_tf
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
    except Exception as e:  # corrupt saved_model.pb, missing variables, ...
        raise ModelFormatError(f"{path}: not a loadable SavedModel ({first_line(e, 160)})") from None
    float_model = _float_tflite(make_converter, path)
    ins, outs = signature_specs(float_model)
    return SourceModel("saved_model", path, sha256_file(path), float_model, ins, outs, make_converter)
