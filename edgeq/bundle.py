"""What `edgeq flash` sends to a board: the bundle (model, manifest, device runner, bundle.json,
SHA256SUMS and, with a runtime, the runtime's wheels for the board's platform)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgeqError, ModelFormatError
from .files import sha256_file
from .runners import DEVICE_BENCH

if TYPE_CHECKING:
    from .flash import FlashOptions

BUNDLE_SCHEMA = "edgeq.bundle/1"
MODEL_NAME = "model.tflite"  # fixed name on the device: services and scripts find it without guessing
MANIFEST_NAME = "model.edgeq.json"
# Where `edgeq flash` installs releases under the board user's home (runners/ssh.py finds the venv there).
FLASH_ROOT = ".local/share/edgeq"
RUNTIME_MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
# pip --platform does not expand manylinux tags downwards, so list the glibc levels a Pi may have.
_GLIBCS = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_27", "manylinux_2_28",
           "manylinux_2_31", "manylinux_2_34", "manylinux_2_35")
ABI_ARCH = {"aarch64": "aarch64", "arm64": "aarch64", "arm64-v8a": "aarch64", "armv7l": "armv7l",
            "armv7": "armv7l", "armeabi-v7a": "armv7l", "x86_64": "x86_64"}


def download_wheels(profile, dest: Path, python_version: str = "311") -> list[Path]:
    """`pip download` the profile's runtime (+ numpy, + pip) for the device's platform into dest."""
    arch = ABI_ARCH.get(str(getattr(profile, "abi", "aarch64")).lower())
    if arch is None:
        raise EdgeqError(f"no wheel platform for ABI {profile.abi!r}; pass --wheels-dir with wheels for it")
    name, version = profile.runtime.name, profile.runtime.version
    if name not in RUNTIME_MODULES:
        raise EdgeqError(f"runtime {name!r} has no pip wheels; use ai-edge-litert or tflite-runtime")
    # tflite-runtime 2.14 is built against numpy 1.x and breaks under numpy 2
    numpy_req = "numpy<2" if name == "tflite-runtime" else "numpy"
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
           "--python-version", python_version, "-d", str(dest)]
    for tag in _GLIBCS:
        cmd += ["--platform", f"{tag}_{arch}"]
    # pip itself too: the board runs it from its wheel, so the venv needs no ensurepip (see _install_runtime)
    cmd += [f"{name}=={version}" if version else name, numpy_req, "pip"]
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EdgeqError(f"could not download {name} wheels for {arch}/cp{python_version}: {tail}; "
                         f"download them elsewhere and pass --wheels-dir")
    return sorted(dest.glob("*.whl"))


def build_bundle(model_path, profile, options: FlashOptions, dest: Path) -> dict:
    """Write the bundle into dest (a local directory) and return its bundle.json content."""
    model = Path(model_path)
    if not model.is_file():
        raise ModelFormatError(f"model not found: {model}; pass the path of a .tflite file")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, dest / MODEL_NAME)
    sha = sha256_file(dest / MODEL_NAME)
    manifest = model.with_suffix(".edgeq.json")
    if manifest.is_file():
        shutil.copyfile(manifest, dest / MANIFEST_NAME)
    else:  # not converted by edgeq: record at least what identifies the model
        (dest / MANIFEST_NAME).write_text(json.dumps(
            {"model": model.name, "sha256": sha, "bytes": model.stat().st_size}, indent=2) + "\n")
    shutil.copyfile(DEVICE_BENCH, dest / "device_bench.py")
    from . import __version__

    info = {"schema": BUNDLE_SCHEMA, "model": model.name, "model_sha256": sha,
            "profile": getattr(profile, "id", None), "runtime": profile.runtime.name,
            "runtime_version": profile.runtime.version, "wheels": [], "runtime_id": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edgeq": __version__}
    if options.with_runtime:
        wdir = dest / "wheels"
        if options.wheels_dir:
            src = sorted(Path(options.wheels_dir).glob("*.whl"))
            if not src:
                raise EdgeqError(f"no .whl files in {options.wheels_dir}; put the runtime wheels there")
            wdir.mkdir()
            for w in src:
                shutil.copyfile(w, wdir / w.name)
        else:
            download_wheels(profile, wdir, options.python_version)
        wheels = sorted(wdir.glob("*.whl"))
        info["wheels"] = [w.name for w in wheels]
        # the same wheels for the same device python are the same runtime: installed once, shared
        ident = "".join(f"{w.name} {sha256_file(w)}\n" for w in wheels) + options.device_python
        tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{info['runtime']}-{info['runtime_version'] or 'any'}")
        info["runtime_id"] = f"{tag}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    (dest / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    # sha256sum -c format; names are our own fixed ones (no spaces/newlines)
    (dest / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.relative_to(dest).as_posix()}\n"
                                             for p in files))
    return info
