"""The manifest `OUT.edgeq.json`: everything later commands (bench, profile, flash, report) need.

Schema "edgeq.manifest/1". Later commands read it instead of re-deriving the conversion.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import EdgeqError

SCHEMA = "edgeq.manifest/1"
_DEPS = ("tensorflow-cpu", "tensorflow", "ai-edge-litert", "litert-quantizer", "numpy", "torch",
         "transformers", "litert-torch")


def manifest_path(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".edgeq.json")


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


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeqError(f"{path}: cannot read manifest ({e}); re-run edgeq convert") from None
    if data.get("schema") != SCHEMA:
        raise EdgeqError(f"{path}: not an edgeq manifest (schema {data.get('schema')!r}, want {SCHEMA})")
    return data
