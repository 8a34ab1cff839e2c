"""Safe output files: written atomically (temp file + rename), never over an input, never half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiskFullError, OutputExistsError
from .interrupts import check as check_interrupt


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KB" (binary units, as df -h)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_error(e: BaseException, path: Path | str, needed: int) -> DiskFullError | None:
    """The one-line error for a write that failed on a full disk or quota, else None."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        free = f", {human_bytes(shutil.disk_usage(where).free)} free"
    except OSError:
        free = ""
    what = "no space left on the disk" if e.errno == errno.ENOSPC else "disk quota exceeded"
    return DiskFullError(f"{path}: {what} ({human_bytes(needed)} to write{free} in {where}); "
                         f"free some space there or write to another directory")


def check_output(out: Path, inputs: list[Path | str | None], force: bool) -> None:
    """Refuse to write over (or inside) an input, ever; over an existing file only with force."""
    out = Path(out)
    out_r = out.resolve()
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        if not p.exists():
            continue
        p_r = p.resolve()
        if out_r == p_r or (p.is_dir() and p_r in out_r.parents):
            raise OutputExistsError(f"{out}: refusing to overwrite the input {p}; choose another output path")
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; pass a file path")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise OutputExistsError(f"{out.parent}: output directory {what}; create it or choose another path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write all of data to path or nothing: a full disk raises DiskFullError and leaves no file
    (path keeps its old content). A Ctrl-C that arrived earlier, even one swallowed on its way up,
    stops it before anything is written (interrupts.check)."""
    check_interrupt()
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no inode left is a full disk too
        raise disk_full_error(e, path, len(raw)) or e from None
    try:
        # mkstemp makes 0600 files; outputs get the usual mode so device services can read them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full_error(e, path, len(raw))
        if full:
            raise full from None
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, streamed; of a directory, over its files' relative names and contents."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
