"""torch.export programs (`torch.export.save`, `.pt2`) as a model source: PyTorch -> LiteRT.

A program is loaded with `torch.export.load`, converted with litert-torch from `ep.module()` and
its saved example inputs (batch 1) to a float .tflite with a `serving_default` signature, and
then goes through the pipeline like any other source. The LiteRT model keeps PyTorch's layout
(NCHW images: calibration feeds them NCHW). The source keeps `ep.module()` as the reference, so
fidelity can be measured against PyTorch's own output too.

Detection reads the zip's directory only (no torch import): `torch.export.save` writes
`<name>/archive_format` = "pt2" beside `<name>/models/*.json` (torch 2.7 and older: a top-level
`version` and `serialized_exported_program.json`).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelFormatError, first_line
from ..files import sha256_file
from ..signature import signature_specs
from ..quiet import quiet_native
from . import SourceModel
from .shapes import check_given, dims, parse_shape, suggestion  # noqa: F401 (parse_shape: re-exported)
from .torch_util import litert_convert, require_modules

ZIP_MAGIC = b"PK\x03\x04"
EXPORT_HOWTO = ("ep = torch.export.export(model.eval(), (example,)); torch.export.save(ep, 'model.pt2') "
                "(docs/pytorch.md)")


class ArchiveKind(str, Enum):
    """What a zip file holds, as far as PyTorch goes."""

    PROGRAM = "torch.export program"
    AOTI = "AOTInductor package"  # compiled code, no graph to convert
    CHECKPOINT = "torch.save checkpoint"  # weights or a pickled module
    TORCHSCRIPT = "TorchScript archive"
    OTHER = "zip archive"


def archive_kind(path: Path) -> ArchiveKind | None:
    """What a zip file holds (None: not a zip). Reads the zip directory and one 3-byte entry."""
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            fmt = [n for n in names if re.fullmatch(r"[^/]+/archive_format", n)]
            if fmt and z.read(fmt[0]).strip() == b"pt2":
                prefix = fmt[0].split("/")[0]
                if any(re.fullmatch(re.escape(prefix) + r"/models/[^/]+\.json", n) for n in names):
                    return ArchiveKind.PROGRAM
                return ArchiveKind.AOTI if any("/aotinductor/" in n for n in names) else ArchiveKind.OTHER
            if "version" in names and "serialized_exported_program.json" in names:
                return ArchiveKind.PROGRAM  # the layout torch <= 2.7 wrote; torch.export.load still reads it
            if any(n.endswith("/data.pkl") for n in names):
                return (ArchiveKind.TORCHSCRIPT if any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
                        else ArchiveKind.CHECKPOINT)
    except (zipfile.BadZipFile, OSError, KeyError):
        return ArchiveKind.OTHER
    return ArchiveKind.OTHER


def check_archive(path: Path) -> bool:
    """True for a torch.export program; a one-line error for PyTorch files that are not one."""
    kind = archive_kind(path)
    if kind is ArchiveKind.PROGRAM:
        return True
    if kind in (ArchiveKind.CHECKPOINT, ArchiveKind.TORCHSCRIPT, ArchiveKind.AOTI):
        raise ModelFormatError(f"{path}: a {kind.value}, not a torch.export program; export the model: "
                               f"{EXPORT_HOWTO}")
    if path.suffix.lower() == ".pt2":
        what = "a zip archive without a torch.export program in it" if kind else "not a zip archive"
        raise ModelFormatError(f"{path}: {what}; torch.export.save writes .pt2 files: {EXPORT_HOWTO}")
    return False


@dataclass(frozen=True)
class ProgramInput:
    """One user input of the program: its signature name in the .tflite and what the program declares."""

    name: str  # args_0, args_1, ... then keyword names (litert-torch's naming)
    shape: tuple[int | None, ...]  # None: a dynamic dimension
    dtype: object  # torch.dtype
    example_shape: tuple[int, ...]  # the saved example's


def load_torch_export(path: Path, input_shapes: tuple[tuple[int, ...], ...] = ()) -> SourceModel:
    """`input_shapes` (one per input, in order) pins dynamic dimensions; without it a dynamic batch
    is pinned to 1 and any other dynamic dimension is refused with the fix."""
    require_modules("torch.export programs")
    import torch

    try:
        with quiet_native():  # the loader logs deprecation notices and warnings
            ep = torch.export.load(str(path))
    except Exception as e:  # deserialisation raises RuntimeError, KeyError, pickle errors, ...
        raise ModelFormatError(f"{path}: not a loadable torch.export program ({first_line(e, 160)}); re-save "
                               f"it with torch.export.save under torch {torch.__version__.split('+')[0]}") from None
    _refuse_training_mode(ep, path)
    args, kwargs = _example(ep, path)
    inputs = _program_inputs(ep, args, kwargs, path)
    shapes, notes = _static_shapes(inputs, input_shapes, path)
    args, kwargs = _sample_inputs(inputs, shapes, args, kwargs)

    module = ep.module()
    float_tflite = litert_convert(module, args, kwargs, what=path.name,
                                  hint="export with static shapes and standard aten ops (docs/pytorch.md)")
    ins, outs = signature_specs(float_tflite)
    n_out = len(ep.graph_signature.user_outputs)  # flattened, as litert-torch names them
    reference = None
    if ({s.name for s in outs} == {f"output_{i}" for i in range(n_out)}
            and {s.name for s in ins} == {p.name for p in inputs}):
        reference = _reference(module, inputs, [s.name for s in outs])
    else:
        notes.append("fidelity against PyTorch is not measured: the LiteRT signature does not map to the "
                     "program's inputs and outputs")
    described = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))} {s.dtype}" for s in ins)
    desc = f"torch.export program via litert-torch; inputs {described}"
    return SourceModel("torch_export", path, sha256_file(path), float_tflite, ins, outs,
                       notes=tuple(notes), description=desc, reference=reference)


def _refuse_training_mode(ep, path: Path) -> None:
    """A program exported from a model in train() mode normalises with batch statistics and drops
    activations at random: the converted model would compute something else."""
    for node in ep.graph.nodes:
        target = str(node.target)
        if ("batch_norm" in target and len(node.args) > 5 and node.args[5] is True) or (
                target.startswith("aten.dropout") and len(node.args) > 2 and node.args[2] is True):
            raise ModelFormatError(f"{path}: exported in training mode ({target} computes training "
                                   "statistics); call model.eval() before torch.export.export")


def _example(ep, path: Path) -> tuple[tuple, dict]:
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise ModelFormatError(f"{path}: the program carries no example inputs; export it with "
                               "torch.export.export(model, (example,)) under torch >= 2.6")
    args, kwargs = example
    return tuple(args), dict(kwargs or {})


def _program_inputs(ep, args: tuple, kwargs: dict, path: Path) -> list[ProgramInput]:
    import torch

    flat = list(args) + list(kwargs.values())
    if not all(isinstance(x, torch.Tensor) for x in flat):
        raise ModelFormatError(f"{path}: the program takes nested or non-tensor inputs; export a "
                               "wrapper whose forward takes tensors only")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [placeholders[name].meta.get("val") for name in ep.graph_signature.user_inputs]
    if len(user) != len(flat) or not all(isinstance(v, torch.Tensor) for v in user):
        raise ModelFormatError(f"{path}: the program's inputs do not match its example inputs; export a "
                               "wrapper whose forward takes tensors only")
    names = [f"args_{i}" for i in range(len(args))] + list(kwargs)
    return [ProgramInput(name, tuple(int(d) if isinstance(d, int) else None for d in v.shape), v.dtype,
                         tuple(x.shape)) for name, v, x in zip(names, user, flat)]


def _static_shapes(inputs: list[ProgramInput], given: tuple[tuple[int, ...], ...],
                   path: Path) -> tuple[list[tuple[int, ...]], list[str]]:
    """One static shape per input, and notes saying what was pinned."""
    if given:
        return list(given), check_given([(s.name, s.shape) for s in inputs], given, path)
    shapes, pinned = [], []
    for spec in inputs:
        if None in spec.shape[1:]:
            suggest = suggestion(spec.shape, spec.example_shape)
            raise ModelFormatError(f"{path}: input {spec.name} has dynamic dimensions ({dims(spec.shape)}); "
                                   f"export with static shapes, or pass --input-shape (e.g. {suggest})")
        if spec.shape and spec.shape[0] is None:
            pinned.append(spec.name)
        shapes.append(tuple(1 if d is None else d for d in spec.shape))
    notes = [f"dynamic batch of {', '.join(pinned)} pinned to 1 (the LiteRT model is static)"] if pinned else []
    return shapes, notes


def _sample_inputs(inputs: list[ProgramInput], shapes: list[tuple[int, ...]], args: tuple,
                   kwargs: dict) -> tuple[tuple, dict]:
    """Example tensors of the static shapes: the saved examples where they fit (the first rows of
    a larger batch), else seeded random values (conversion only traces; values do not matter)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    flat = list(args) + list(kwargs.values())
    out = []
    for spec, shape, x in zip(inputs, shapes, flat):
        if tuple(x.shape[1:]) == shape[1:] and x.shape[0] >= shape[0]:
            out.append(x[:shape[0]].contiguous())
        elif spec.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(spec.dtype))
        else:
            out.append(torch.zeros(shape, dtype=spec.dtype))
    return tuple(out[:len(args)]), dict(zip(kwargs, out[len(args):]))


def _reference(module, inputs: list[ProgramInput], output_names: list[str]
               ) -> Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]:
    """Runs the program itself on samples keyed by the .tflite's input names; outputs stacked on
    axis 0, keyed and ordered as the .tflite's signature outputs."""

    def reference(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        import torch
        from torch.utils import _pytree as pytree

        n_args = sum(s.name.startswith("args_") for s in inputs)
        collected: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
        # One sample at a time (the program's batch is static) on one thread: torch's thread pool
        # spin-waits, and on a busy host 2 threads ran MobileNetV2 at 2.4 s per image, 1 at 0.13 s.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                for sample in samples:
                    xs = [torch.from_numpy(np.array(sample[s.name])).to(s.dtype) for s in inputs]
                    ys = pytree.tree_leaves(module(*xs[:n_args], **{s.name: x for s, x in zip(inputs[n_args:],
                                                                                              xs[n_args:])}))
                    for i, y in enumerate(ys):
                        collected[f"output_{i}"].append(y.detach().float().numpy())
        finally:
            torch.set_num_threads(threads)
        return {name: np.concatenate(v, axis=0) if v else np.zeros(0, np.float32)
                for name, v in collected.items()}

    return reference
