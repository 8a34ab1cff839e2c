"""PyTorch helpers shared by the PyTorch-based sources (Hugging Face encoders, torch.export programs).

torch and litert-torch are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..errors import EdgeqError, IncompatibleModelError, first_line
from ..quiet import quiet_native

INSTALL_HINT = ("pip install 'edgeq[hf]' (CPU torch: add --extra-index-url "
                "https://download.pytorch.org/whl/cpu)")


def require_modules(what: str, modules: Sequence[str] = ("torch", "litert_torch")) -> None:
    """Import the PyTorch side (the [hf] extra) or say how to get it."""
    import importlib

    for name in modules:
        try:
            with quiet_native():  # torchao (under litert-torch) reports optional kernels it cannot load
                importlib.import_module(name)
        except ImportError as e:
            raise EdgeqError(f"{what} need the hf extra ({e.name or name} is missing): {INSTALL_HINT}") from None


def litert_convert(module, args: tuple = (), kwargs: dict | None = None, *, what: str, hint: str) -> bytes:
    """A float .tflite with a `serving_default` SignatureDef, from litert-torch.

    litert-torch names the inputs args_0, args_1, ... (then the kwargs by name) and the outputs
    output_0, output_1, ... in flattened order. It prints a progress tree on stdout and export
    warnings on stderr: both are captured (`--json` promises stdout to edgeq)."""
    import litert_torch

    try:
        with quiet_native():
            edge = litert_torch.convert(module, tuple(args), sample_kwargs=kwargs or None)
            tflite = bytes(edge.model_content())
    except Exception as e:  # torch.export and the MLIR lowering raise many types; the fix is the same
        raise IncompatibleModelError(f"litert-torch could not convert {what}: {first_line(e)}; {hint}") from None
    return short_tensor_names(tflite)


# A module path before a class name in litert-torch's tensor names ("torch.nn.modules.linear." in
# "torch.nn.modules.linear.Linear_dense", "net." in "net.Model"): lower-case module segments (and
# "<locals>"), then a capital.
_QUALIFIER = re.compile(r"(?<![\w.<>])(?:(?:[a-z_][a-z0-9_]*|<locals>)\.)+(?=[A-Z])")


def short_tensor_names(tflite: bytes) -> bytes:
    """The model with each tensor name's module paths dropped, class and attribute names kept
    ("WithTypes/BertModel_model/.../BertOutput_output/Linear_dense;1").

    litert-torch names a tensor by the fully qualified class of every module on its path, fused ops by
    several such paths: 232 KB of names in an int4 all-MiniLM-L6-v2 of 12.1 MB, bytes that count
    against a size goal and a download. Left as they are if two distinct names would become one."""
    from .. import tflite_edit as te

    m = te.load(tflite)
    tensors = [t for sg in m.subgraphs for t in sg.tensors]
    old = [te.tensor_name(t) for t in tensors]
    new = [_QUALIFIER.sub("", n) for n in old]
    if new == old or len(set(new)) != len(set(old)):
        return tflite
    for t, name in zip(tensors, new):
        t.name = name.encode()
    return te.pack(m)


def table_lookup(table, index):
    """table[index] written as index_select: litert-torch lowers it to GATHER, which has an int8
    kernel (nn.Embedding becomes EMBEDDING_LOOKUP, which the LiteRT quantizer keeps float)."""
    import torch

    return torch.index_select(table, 0, index.reshape(-1)).reshape(*index.shape, *table.shape[1:])


def channel_absmax(model, batches: dict[str, np.ndarray], modules: Sequence, *, of: str = "input",
                   skip_first_token: bool = False) -> list:
    """Per-channel max |x| of each module's first input (of="input") or its output (of="output")
    over one forward pass of `batches` (keyword arguments of `model`); skip_first_token leaves
    position 0 ([CLS]) out.

    Padded positions stay in: the quantized graph runs them through the same ops."""
    import torch

    amax: dict[int, torch.Tensor] = {}

    def record(i, x):
        x = x.detach()[:, 1:] if skip_first_token else x.detach()
        a = x.abs().flatten(0, -2).amax(0)
        amax[i] = a if i not in amax else torch.maximum(amax[i], a)

    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: record(i, args[0])) if of == "input"
               else m.register_forward_hook(lambda _m, _a, out, i=i: record(i, out))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in batches.items()})
    finally:
        for h in handles:
            h.remove()
    return [amax[i] for i in range(len(modules))]
