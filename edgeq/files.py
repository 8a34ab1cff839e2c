"""Safe output files: written atomically (temp file + rename), never over an input, never half-written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import DiskFullError, OutputExistsError
from .interrupts import check as check_interrupt


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KB" (binary units, as df -h)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_error(e: BaseException, path: Path | str, needed: int | None) -> DiskFullError | None:
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
    size = f"{human_bytes(needed)} to write" if needed is not None else "writing"
    return DiskFullError(f"{path}: {what} ({size}{free} in {where}); "
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
    # before any slow work: the writes would fail at the end (a read-only mount, no permission)
    if not os.access(out.parent, os.W_OK):
        raise OutputExistsError(f"{out}: cannot write there (no write access to {out.parent}); choose another "
                                "output path")
    if len(f".{out.name}.XXXXXXXX.tmp{BACKUP_SUFFIX}".encode()) > _name_max(out.parent):  # write_all's names
        raise OutputExistsError(f"{out}: cannot write there (file name too long); choose a shorter name")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write all of data to path or nothing: a full disk raises DiskFullError and leaves no file
    (path keeps its old content). A Ctrl-C that arrived earlier, even one swallowed on its way up,
    stops it before anything is written (interrupts.check)."""
    write_all([(Path(path), data)])


def write_all(files: Sequence[tuple[Path, bytes | str]]) -> None:
    """Write every (path, data) or none: each goes to a temporary file beside it first, and only when
    all are on the disk are they renamed over their paths, Ctrl-C / SIGTERM held back meanwhile
    (interrupts.held). A failed write (a full disk, a Ctrl-C) leaves every path as it was: a model,
    its samples and its manifest replaced with --force were deleted after a later one failed, and the
    old manifest was left describing a model that was gone."""
    from .interrupts import held

    check_interrupt()
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            temps.append((_temp_copy(Path(path), data.encode() if isinstance(data, str) else data), Path(path)))
        with held():
            _publish(temps)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _publish(temps: list[tuple[str, Path]]) -> None:
    """Rename each temporary file over its path. Each earlier file is kept first (a hard link, else a
    copy: FAT has no links), so if a rename fails (a directory in the way) or is interrupted, the
    paths renamed before it get their earlier files back, and a path that was new goes away."""
    existed = {path: os.path.lexists(path) for _, path in temps}
    backups: dict[Path, str] = {}
    try:
        for tmp, path in temps:  # before any rename: a failure here changes nothing
            if existed[path] and (kept := _keep(path, f"{tmp}{BACKUP_SUFFIX}")):
                backups[path] = kept
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise unwritable_error(e, path) from None
    except BaseException:
        # renamed: its temporary file is gone (an interrupt may land between the rename and any record)
        renamed = [(tmp, path) for tmp, path in temps if not os.path.exists(tmp)]
        for _, path in reversed(renamed):
            with contextlib.suppress(OSError):
                if path in backups:
                    os.replace(backups.pop(path), path)
                elif not existed[path]:
                    path.unlink()
                # (existed, but nothing could be kept: the new file stays rather than nothing)
        raise
    finally:  # every kept file not put back (named by its temporary file: one made as an interrupt came too)
        for tmp, _ in temps:
            if os.path.lexists(tmp + BACKUP_SUFFIX):
                os.unlink(tmp + BACKUP_SUFFIX)


BACKUP_SUFFIX = ".old"  # after the temporary file's name: check_output counts it in the name's length


def _keep(path: Path, backup: str) -> str | None:
    """`path`'s current file kept as `backup` (a hard link, else a copy); None when neither works."""
    try:
        os.link(path, backup, follow_symlinks=False)
        return backup
    except OSError:
        pass
    try:
        shutil.copyfile(path, backup, follow_symlinks=False)
        return backup
    except OSError:
        if os.path.lexists(backup):
            os.unlink(backup)
        return None


def _temp_copy(path: Path, raw: bytes) -> str:
    """`raw` in a new temporary file beside `path`, on the disk (fsync); its name."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no inode left is a full disk too
        raise disk_full_error(e, path, len(raw)) or unwritable_error(e, path) from None
    try:
        # mkstemp makes 0600 files; outputs get the usual mode so device services can read them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise disk_full_error(e, path, len(raw)) or unwritable_error(e, path) from None
        raise
    return tmp


def unwritable_error(e: OSError, path: Path | str) -> OutputExistsError:
    """The one-line error for an output that cannot be written where it was asked (a read-only file
    system, no permission, a name too long): not a traceback."""
    why = e.strerror or type(e).__name__
    return OutputExistsError(f"{path}: cannot write there ({why.lower()}); choose another output path")


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
