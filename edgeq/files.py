"""Safe output files: written atomically (temp file + rename), never over an input, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import OutputExistsError


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse to write over an input (ever) or an existing file (without --force)."""
    out_r = out.resolve()
    for p in inputs:
        if p.exists() and out_r == p.resolve():
            raise OutputExistsError(f"{out}: refusing to overwrite the input; choose another -o path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; pass a file path to -o")
    if not out.parent.exists():
        raise OutputExistsError(f"{out.parent}: output directory does not exist; create it first")


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
