"""The manifest `OUT.edgeq.json`: everything later commands (bench, profile, flash, report) need.

Schema "edgeq.manifest/1", built here from what a conversion produced (`build_manifest`), written
next to the model (`write_manifest`) and read back checked (`read_manifest`); later commands read
it instead of re-deriving the conversion. Top-level sections:

  schema, created, edgeq_version, scheme, calibrated, device, warnings, versions
  output       {path, sha256, bytes}: the quantized .tflite
  source       {path, format, sha256, float_bytes, float_sha256, description}
  io           {inputs, outputs}: tensors of the produced model (name, dtype, shape, scale, zero_point)
  calibration  CalibrationData.describe() + range_method ({kind: "none", ...} without --calib)
  plan         plan.Plan.to_json() or null; ops, op_summary: the produced model's ops, read back
  fidelity     {samples, outputs: [{name, cosine, rel_l2, max_abs, top1_agreement}], inputs} or null
  budget       the accuracy-budget report (budget.run_budget) or null
  optimize     {level, asked, why, steps: [{step, kept, before, after, seconds, detail}], final, ...}:
               the accuracy methods that ran (optimize.OptimizeResult.to_json()) and what each bought
  size_goal    {max_bytes, chosen, why (when a less accurate mix was chosen), tried: [{scheme, bytes,
               cosine}]} (--max-size) or null
  compatibility compat.CompatReport.to_json() or null; sizes {float_bytes, quantized_bytes, ratio[, source_bytes]}

Readers other than convert's own tests treat every section but the schema as optional.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import EdgeqError
from .files import atomic_write, sha256_bytes

if TYPE_CHECKING:  # only for annotations: reading a manifest must not import the converter stack
    from .calibration import CalibrationData
    from .compat import CompatReport
    from .plan import Plan
    from .precision import IoType, Scheme
    from .sources import SourceModel
    from .tflite_model import ModelInfo
    from .fidelity import Fidelity

SCHEMA = "edgeq.manifest/1"
_DEPS = ("tensorflow-cpu", "tensorflow", "ai-edge-litert", "litert-quantizer", "numpy", "torch",
         "transformers", "litert-torch")

# Type of each top-level section when present (None: may be null).
_SECTIONS: dict[str, tuple[type | None, ...]] = {
    "created": (str,), "edgeq_version": (str,), "output": (dict,), "source": (dict,), "scheme": (str,),
    "calibrated": (bool,), "device": (str, None), "io": (dict,), "calibration": (dict,), "plan": (dict, None),
    "ops": (list,), "op_summary": (dict,), "fidelity": (dict, None), "budget": (dict, None),
    "optimize": (dict, None), "size_goal": (dict, None),
    "compatibility": (dict, None), "sizes": (dict,),
    "verification": (dict, None), "fidelity_source": (dict, None), "samples": (dict, str, None),
    "warnings": (list,), "versions": (dict,),
}


def manifest_path(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".edgeq.json")


def samples_path(model_path: Path) -> Path:
    """The held-out samples convert keeps beside the model (bench/profile/flash feed them by default)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".samples.npz")


def versions() -> dict[str, str]:
    out = {"edgeq": __version__, "python": platform.python_version()}
    for name in _DEPS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ManifestParts:
    """What one conversion produced, as `build_manifest` records it."""

    model: Path  # the source model as given
    output: Path  # the quantized .tflite
    model_bytes: bytes  # its content
    source: SourceModel
    scheme: Scheme
    io: IoType
    device: str | None
    calibration: CalibrationData  # random inputs when the user gave no --calib
    user_calibration: bool  # --calib given: fidelity on held-out samples, else on random inputs
    range_method: str
    plan: Plan | None
    info: ModelInfo  # the produced model, read back
    fidelity: Fidelity | None
    budget: dict | None
    compatibility: CompatReport | None
    warnings: tuple[str, ...] = ()
    verification: dict | None = None  # verify.RunCheck.to_json(): the written model run under the target's options
    fidelity_source: dict | None = None  # fidelity against the source framework's own model (PyTorch)
    samples: dict | None = None  # {"file": "<stem>.samples.npz", "count": N}: real held-out inputs for bench/profile
    optimize: dict | None = None  # the accuracy level that ran and each step's before/after (--optimize)
    size_goal: dict | None = None  # the candidates --max-size tried and the one it chose


def build_manifest(p: ManifestParts) -> dict[str, Any]:
    """The manifest dict for one conversion (checked against the schema)."""
    data, src, q = p.calibration, p.source, p.model_bytes
    calib = data.describe() if p.user_calibration else {"kind": "none", "calibrated": False, "eval_kind": "random"}
    calib["range_method"] = p.range_method
    if calib.get("source") and calib["source"] != "random":
        calib["source"] = str(Path(calib["source"]).resolve())
    manifest = {
        "schema": SCHEMA,
        "created": now(),
        "edgeq_version": versions()["edgeq"],
        "output": {"path": p.output.name, "sha256": sha256_bytes(q), "bytes": len(q)},
        "source": {"path": str(Path(p.model).resolve()), "format": src.format, "sha256": src.sha256,
                   "float_bytes": len(src.float_tflite), "float_sha256": sha256_bytes(src.float_tflite),
                   "description": src.description},
        "scheme": p.scheme.value,
        "calibrated": bool(data.calibrated) or not p.scheme.needs_calibration,
        "device": p.device,
        "io": {"inputs": [t.to_json() for t in p.info.inputs], "outputs": [t.to_json() for t in p.info.outputs]},
        "calibration": calib,
        "plan": p.plan.to_json() if p.plan is not None else None,
        "ops": [op.to_json() for op in p.info.ops],
        "op_summary": p.info.op_summary(),
        "fidelity": ({**p.fidelity.to_json(), "inputs": "held-out" if p.user_calibration else "random"}
                     if p.fidelity else None),
        "budget": p.budget,
        "optimize": p.optimize,
        "size_goal": p.size_goal,
        "compatibility": p.compatibility.to_json() if p.compatibility is not None else None,
        "sizes": {"float_bytes": len(src.float_tflite), "quantized_bytes": len(q),
                  "ratio": len(src.float_tflite) / max(len(q), 1), **_source_bytes(p.model, src)},
        "verification": p.verification,
        "fidelity_source": p.fidelity_source,
        "samples": p.samples,
        "warnings": list(p.warnings),
        "versions": versions(),
    }
    return check_manifest(manifest, "manifest")


def write_manifest(path: Path, manifest: dict) -> None:
    """Check and write atomically (the caller decides about overwriting, see files.check_output)."""
    atomic_write(Path(path), manifest_text(path, manifest))


def manifest_text(path: Path, manifest: dict) -> str:
    """The checked manifest as write_manifest writes it (for files.write_all with its model)."""
    return json.dumps(check_manifest(manifest, str(path)), indent=2, sort_keys=False) + "\n"


def read_manifest(path: Path | str) -> dict:
    """The manifest at `path`, checked against the schema; EdgeqError in one line otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeqError(f"{path}: cannot read manifest ({e}); re-run edgeq convert") from None
    return check_manifest(data, str(path))


def _source_bytes(model, src) -> dict:
    """The given .tflite's own size where it is smaller than its float32 form (float16 or sparse weights):
    "3.88x smaller than float" would read as against the file the user has, which is half that."""
    path = Path(model)
    if src.format != "tflite" or not path.is_file():
        return {}
    size = path.stat().st_size
    # (a signature edgeq added or a pinned batch changes a float32 file's size by a little, not by 10 %)
    return {"source_bytes": size} if size < 0.9 * len(src.float_tflite) else {}


def check_manifest(data: Any, where: str) -> dict:
    """`data` if it is an edgeq.manifest/1 document whose sections have their types."""
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise EdgeqError(f"{where}: not an edgeq manifest (schema {schema!r}, want {SCHEMA}); "
                         "pass the OUT.edgeq.json that edgeq convert wrote")
    for key, types in _SECTIONS.items():
        v = data.get(key)
        if key in data and not any(v is None if t is None else isinstance(v, t) for t in types):
            want = " or ".join("null" if t is None else _JSON_NAMES[t] for t in types)
            raise EdgeqError(f"{where}: bad manifest: {key} is {_json_name(v)}, want {want}; "
                             "re-run edgeq convert")
    return data


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}


def _json_name(v: Any) -> str:
    if v is None:
        return "null"
    return next((name for t, name in _JSON_NAMES.items() if isinstance(v, t)), type(v).__name__)
