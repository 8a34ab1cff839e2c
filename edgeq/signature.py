"""Model signatures: read input/output specs, and add a SignatureDef to files that lack one.

Older converters wrote .tflite files with no SignatureDef; the LiteRT quantizer (and signature
runners) need one, so edgeq adds a `serving_default` signature mapping subgraph 0's inputs and
outputs by tensor name. The graph itself is not touched.
"""

from __future__ import annotations

import re

from .calibration import InputSpec
from .errors import ModelFormatError, first_line
from .tflite_model import SIGNATURE_KEY, read_model
from .quiet import quiet_native


def ensure_signature(model: bytes) -> tuple[bytes, bool]:
    """(model with a signature, whether one was added)."""
    if read_model(model).has_signature:
        return model, False
    from . import tflite_edit as te

    s = te.schema()
    m = te.load(model)  # keeps buffers stored after the flatbuffer (large models)
    sg = m.subgraphs[0]
    sig = s.SignatureDefT()
    sig.signatureKey = SIGNATURE_KEY
    sig.subgraphIndex = 0

    def tmap(idx):
        t = s.TensorMapT()
        t.name = sg.tensors[idx].name
        t.tensorIndex = int(idx)
        return t

    sig.inputs = [tmap(i) for i in sg.inputs]
    sig.outputs = [tmap(i) for i in sg.outputs]
    m.signatureDefs = [sig]
    return te.pack(m), True


def default_signature(model: bytes, what: str) -> tuple[bytes, str]:
    """(model, the key its signature had): edgeq runs and quantizes the `serving_default` signature,
    so a model whose one signature has another name (a SavedModel exported with signatures={"predict":
    ...}) gets it renamed; convert writes the original name back (rename_signature). Several
    signatures, none of them serving_default, are refused naming them."""
    keys = read_model(model).signature_keys
    if not keys or SIGNATURE_KEY in keys:
        return model, SIGNATURE_KEY
    if len(keys) > 1:
        raise ModelFormatError(f"{what}: {len(keys)} signatures ({', '.join(keys)}) and none is "
                               f"{SIGNATURE_KEY}; edgeq converts one: save the one you want as {SIGNATURE_KEY}")
    return rename_signature(model, SIGNATURE_KEY), keys[0]


def rename_signature(model: bytes, key: str) -> bytes:
    """The model with its (first) SignatureDef named `key`; `model` itself when it already is."""
    if read_model(model).signature_keys[:1] == (key,):
        return model
    from . import tflite_edit as te

    m = te.load(model)
    m.signatureDefs[0].signatureKey = key
    return te.pack(m)


def signature_specs(model: bytes, key: str = SIGNATURE_KEY) -> tuple[tuple[InputSpec, ...], tuple[InputSpec, ...]]:
    """Input and output specs of a signature, in signature order, read by the LiteRT interpreter."""
    runner = signature_runner(model, key)
    ins = runner.get_input_details()
    outs = runner.get_output_details()

    def spec(name, d):
        sig = d.get("shape_signature")
        shape = tuple(int(x) for x in (sig if sig is not None and len(sig) else d["shape"]))
        return InputSpec(name, shape, _dtype_name(d["dtype"]))

    return tuple(spec(n, d) for n, d in ins.items()), tuple(spec(n, d) for n, d in outs.items())


def signature_runner(model: bytes, key: str = SIGNATURE_KEY, threads: int = 2):
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_native():  # the interpreter announces its XNNPACK delegate on stderr
            interp = Interpreter(model_content=model, num_threads=threads)
            keys = list(interp.get_signature_list())
            return interp.get_signature_runner(key if key in keys else keys[0])
    except (ValueError, RuntimeError, IndexError) as e:
        # The custom-op hint only where the runtime names an op it lacks: it misled on a bias with 24
        # scales on an axis of 1 (PP-OCRv4's detector), which has no custom op.
        hint = (". Custom ops must be registered with the runtime; see the op table"
                if re.search(r"custom op|unresolved|didn't find op|op builtin_code", str(e), re.I) else "")
        raise ModelFormatError(f"the LiteRT interpreter cannot load this model: {first_line(e)}{hint}") from None


def _dtype_name(dt) -> str:
    import numpy as np
    return np.dtype(dt).name
