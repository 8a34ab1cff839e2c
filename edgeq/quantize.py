"""Apply a scheme (or a per-op plan) to a source model and return the quantized .tflite bytes.

Uniform schemes on Keras/SavedModel go through the TFLite converter (it also sets integer I/O);
per-op plans and float .tflite inputs go through the LiteRT quantizer (`litert_quant.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import EdgeqError, QuantizationError, first_line
from .litert_quant import OpPrecision, Reiterable, quantize_per_op
from .precision import IoType, Scheme, check_io
from .sources import SourceModel

# The LiteRT quantizer path keeps float I/O or makes it int8 (quantize_per_op's keep_float_io).
LITERT_IO = (IoType.FLOAT32, IoType.INT8)


@dataclass(frozen=True)
class QuantizeRequest:
    scheme: Scheme
    io: IoType = IoType.FLOAT32
    per_op: tuple[OpPrecision, ...] = ()  # empty: uniform scheme
    adjust_ranges: Callable[[dict], dict] | None = None


class KeptCalibration:
    """The TFLite converter and its calibrator, kept from one conversion of a source to the next with
    the same request: the next skips the graph conversion (it quantizes the float model the first one
    made) and is fed only the samples the first was not (pass only those); the calibrator's
    statistics are a running min/max over everything fed, so the model is the one calibrating on all
    of them gives. With little data convert quantizes a twin on part of the samples, then the written
    model on all of them: TensorFlow converted the graph again and calibrated the first part twice
    (nsfwjs' InceptionV3 at --optimize none: 90 s, against 50 s for the default level)."""

    def __init__(self):
        self.calibrator = None
        self.converter = None
        self.float_model = None  # what the converter's quantization step gets: (model, mode, debug options, quant_io)
        self.fed = False


def quantize(source: SourceModel, req: QuantizeRequest,
             calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None,
             kept: KeptCalibration | None = None) -> bytes:
    """`calibration` returns a fresh iterator of samples (the TF converter streams it). `kept`: the
    TFLite converter's calibration carried over from an earlier call (see KeptCalibration)."""
    check_io(req.scheme, req.io)
    if uses_converter(source, req):
        return _with_converter(source, req, calibration, kept)
    check_litert(source, req)
    samples = Reiterable(calibration) if (calibration and req.scheme.needs_calibration) else None
    return quantize_per_op(source.float_tflite, req.scheme.op_precision, req.per_op, samples,
                           keep_float_io=req.io is IoType.FLOAT32, adjust_ranges=req.adjust_ranges)


def uses_converter(source: SourceModel, req: QuantizeRequest) -> bool:
    """Uniform schemes on Keras/SavedModel take the TFLite converter; the rest (and int4, which the
    converter cannot write) the LiteRT quantizer, as do int8 models with a DIV by a computed divisor
    (the quantizer keeps it float: int8_hazards.py)."""
    mixed = any(p.precision != req.scheme.op_precision for p in req.per_op)
    return (source.converter is not None and not mixed and req.adjust_ranges is None and not req.scheme.is_int4
            and not int8_hazard(source, req))


def int8_hazard(source: SourceModel, req: QuantizeRequest) -> bool:
    """The model has ops that must not get int8 activations under this scheme (int8_hazards.py)."""
    from .int8_hazards import INT8_ACTIVATIONS, divisor_hazards

    return req.scheme.op_precision in INT8_ACTIVATIONS and bool(divisor_hazards(source.float_tflite))


def check_litert(source: SourceModel, req: QuantizeRequest, why: str = "") -> None:
    """What the LiteRT quantizer path cannot do; `why` says what sent the model there."""
    why = why or ("a float .tflite/HF source" if source.converter is None else "a per-op plan")
    if req.scheme is Scheme.FP16:
        # the scheme may be a profile's (android-gpu), not the user's --scheme: say what to pass instead
        raise QuantizationError(f"scheme fp16 (--scheme, or the --device profile's) is not available with {why}; "
                                "it needs a Keras/SavedModel source with a uniform scheme: pass --scheme int8 or "
                                "--scheme dynamic for this source")
    check_litert_io(req.io, why)


def check_litert_io(io: IoType, why: str) -> None:
    """The I/O dtypes the LiteRT quantizer path produces; `why` says what sent the model there."""
    if io not in LITERT_IO:
        raise QuantizationError(f"--io {io.value} is not available with {why}; "
                                f"use --io {' or '.join(t.value for t in LITERT_IO)}")


def _keep_calibrator(conv, kept: KeptCalibration) -> None:
    """Route `conv`'s calibration through `kept`'s calibrator (made on the first call). TFLiteConverter
    ._quantize (TF 2.21) for the MLIR quantizer, with the calibrator kept; other paths (16-bit
    activations: the old quantizer calibrates inside) run as TensorFlow's own."""
    import tensorflow as tf
    from tensorflow.lite.python import lite as tfl
    from tensorflow.lite.python.optimize import calibrator as tf_calibrator

    own, optimize = conv._quantize, conv._optimize_tflite_model

    def _optimize_tflite_model(model, quant_mode, debug_options, quant_io=True):
        kept.float_model = (model, quant_mode, debug_options, quant_io)
        return optimize(model, quant_mode, debug_options, quant_io=quant_io)

    def _quantize(result, input_type, output_type, activations_type, bias_type, allow_float,
                  enable_variable_quantization, debug_options):
        if not conv.experimental_new_quantizer or activations_type == tf.int16 or conv._experimental_calibrate_only:
            return own(result, input_type, output_type, activations_type, bias_type, allow_float,
                       enable_variable_quantization, debug_options)
        if kept.calibrator is None:
            regs = conv.target_spec._experimental_custom_op_registerers
            kept.calibrator = tf_calibrator.Calibrator(tf_calibrator.add_intermediate_tensors(result),
                                                       [x for x in regs if isinstance(x, str)],
                                                       [x for x in regs if not isinstance(x, str)])
        data = conv.representative_dataset
        data = data if isinstance(data, tfl.RepresentativeDataset) else tfl.RepresentativeDataset(data)
        calibrated = kept.calibrator.calibrate(data.input_gen)
        kept.fed = True
        return tfl._mlir_quantize(
            calibrated, conv._experimental_disable_per_channel, input_data_type=input_type,
            output_data_type=output_type, enable_variable_quantization=enable_variable_quantization,
            disable_per_channel_for_dense_layers=conv._experimental_disable_per_channel_quantization_for_dense_layers,
            debug_options_str=debug_options.SerializeToString())

    conv._quantize = _quantize
    conv._optimize_tflite_model = _optimize_tflite_model
    kept.converter = conv


def _with_converter(source: SourceModel, req: QuantizeRequest, calibration,
                    kept: KeptCalibration | None = None) -> bytes:
    from .quiet import import_tf, quiet_native
    tf = import_tf()

    again = kept is not None and kept.fed and kept.float_model is not None
    conv = kept.converter if again else source.converter()
    if kept is not None and req.scheme.needs_calibration and not again:
        _keep_calibrator(conv, kept)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    names = [s.name for s in source.inputs]
    if req.scheme.needs_calibration:
        if calibration is None:
            raise QuantizationError(f"--scheme {req.scheme.value} needs calibration data; pass --calib")

        def representative_dataset():
            for sample in calibration():
                # A dict keyed by signature input names works for any number of inputs.
                yield {n: sample[n] for n in names}

        conv.representative_dataset = representative_dataset
    if req.scheme is Scheme.INT8:
        # INT8 first, float builtins allowed: ops that cannot be int8 stay float and are reported.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    elif req.scheme is Scheme.INT16X8:
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS]
    elif req.scheme is Scheme.FP16:
        conv.target_spec.supported_types = [tf.float16]
    if req.io is not IoType.FLOAT32:
        dt = {IoType.INT8: tf.int8, IoType.UINT8: tf.uint8, IoType.INT16: tf.int16}[req.io]
        conv.inference_input_type = dt
        conv.inference_output_type = dt
    try:
        with quiet_native():
            if again:  # the float model of the first conversion: its quantization step and what follows it
                first, mode, debug, quant_io = kept.float_model
                model = bytes(conv._convert_and_export_metrics(
                    lambda c: c._optimize_tflite_model(first, mode, debug, quant_io=quant_io)))
            else:
                model = bytes(conv.convert())
    except EdgeqError:
        raise  # e.g. a calibration sample failed its checks inside the representative dataset
    except Exception as e:  # ConverterError carries the MLIR log; keep the first useful line
        raise QuantizationError(f"TFLite converter failed: {first_line(e)}") from None
    from .float_joins import float_joins

    return float_joins(model)[0]  # the converter joins a detector's boxes and scores in int8 too
