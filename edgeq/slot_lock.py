"""One flash or rollback per deployment slot on a board at a time, across hosts, surviving the
flasher's death: a lock directory on the board with its owner and a heartbeat (SlotLock)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import shlex
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import DeviceError
from .remote import Progress, Remote

HEARTBEAT_S = 20.0  # how often a running flash refreshes its lock (far below stale_after)
BEAT_TIMEOUT_S = 10.0  # a heartbeat that takes longer (at least --connect-timeout) means the link is gone
_HELD: set[str] = set()  # tokens of the slot locks this process holds right now
_HELD_GUARD = threading.Lock()


def this_machine() -> str | None:
    """Who "this host" is for pid checks: hostname + kernel boot id (a pid means nothing on another
    machine or after a reboot). None without a boot id: then only a lock's age counts."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return hashlib.sha256(f"{socket.gethostname()}\n{boot}".encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has ended; its parent just has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class SlotLock:
    """One flash or rollback per slot at a time, across hosts: a directory made with mkdir (atomic).

    `.lock/owner` says who holds it (host, machine id, pid, user, start, a random token) and its
    mtime is a heartbeat, refreshed during long steps. A lock is stale, and taken over with a note,
    when its owner process is gone on this same machine (a killed or crashed flash, a flash of this
    process whose connection died), or when its heartbeat is older than `stale_after` by the
    device's clock (a laptop that vanished). A live lock blocks for `wait` seconds, then fails saying
    who holds it. Breaking a lock is serialised by a second directory, `.lock.break`, and rechecks
    that the lock is still the stale one judged, so two waiters never both take over."""

    def __init__(self, remote: Remote, directory: str, wait: float = 60.0, stale_after: float = 600.0,
                 say: Progress | None = None):
        self.remote, self.wait, self.stale_after = remote, wait, stale_after
        self.say = say or (lambda msg: None)
        self.dir = directory
        self.owner = posixpath.join(directory, "owner")
        self.token = uuid.uuid4().hex
        self._last_beat = 0.0
        self._clock_offset: float | None = None
        self._beat_sftp = None

    def acquire(self, slot_name: str) -> list[str]:
        notes: list[str] = []
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.remote.sftp.mkdir(self.dir, mode=0o700)
            except OSError:
                pass
            else:
                with _HELD_GUARD:
                    _HELD.add(self.token)
                try:
                    self._write_owner()
                except BaseException:  # e.g. a full disk: leave no ownerless lock behind
                    with contextlib.suppress(Exception):
                        self.remote.run(["rm", "-rf", self.dir], 30)
                    raise
                return notes
            seen = self.remote.read_text(self.owner)
            holder = _owner(seen)
            why = self._stale(holder)
            if why and self._break(seen):
                notes.append(f"took over the lock of slot {slot_name!r} held by {_who(holder)}: {why}")
                self.say(notes[-1])
                continue
            if time.monotonic() > deadline:
                age = self._age()
                beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
                raise DeviceError(
                    f"slot {slot_name!r} on {self.remote.target.label} is locked by a running flash of "
                    f"{_who(holder)}{beat}; wait for it to finish and rerun (a lock without heartbeat for "
                    f"{self.stale_after:g} s, or whose process has ended, is taken over)")
            time.sleep(0.5)

    def _write_owner(self) -> None:
        from . import __version__

        try:
            import getpass
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name (containers): the pid still identifies it
            user = "?"
        doc = {"host": socket.gethostname(), "machine": this_machine(), "pid": os.getpid(), "user": user,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "token": self.token, "edgeq": __version__}
        tmp = self.owner + ".tmp"
        with self.remote.sftp.open(tmp, "w") as f:
            f.write(json.dumps(doc) + "\n")
        self.remote.sftp.posix_rename(tmp, self.owner)

    def _stale(self, holder: dict | None) -> str | None:
        """Why the lock's owner is gone, or None while it may still be running."""
        pid = holder.get("pid") if holder else None
        if holder and holder.get("machine") and holder["machine"] == this_machine() and isinstance(pid, int):
            if pid == os.getpid():
                with _HELD_GUARD:
                    if holder.get("token") not in _HELD:
                        return "an earlier flash of this process ended without releasing it"
            elif pid > 0 and not _pid_alive(pid):
                return f"its process {pid} on this host has ended"
        age = self._age()
        if age is not None and age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _age(self, path: str | None = None) -> float | None:
        """Seconds since the lock (or path) last changed, by the device's clock."""
        for p in ([path] if path else [self.owner, self.dir]):
            try:
                mtime = self.remote.sftp.stat(p).st_mtime
                break
            except OSError:
                continue
        else:
            return None
        if self._clock_offset is None:
            code, out, _ = self.remote.run(["date", "+%s"], 30)
            if code != 0 or not out.strip().isdigit():
                return None
            self._clock_offset = int(out) - time.time()
        return time.time() + self._clock_offset - mtime

    def _break(self, seen: str | None) -> bool:
        guard = self.dir + ".break"
        try:
            self.remote.sftp.mkdir(guard, mode=0o700)
        except OSError:  # another waiter is breaking it; a guard left by a crash expires after a minute
            age = self._age(guard)
            if age is not None and age > 60:
                with contextlib.suppress(Exception):
                    self.remote.sftp.rmdir(guard)
            return False
        try:
            now = self.remote.read_text(self.owner)
            if now != seen or not self._stale(_owner(now)):
                return False  # it changed since it was judged: not the abandoned lock any more
            for name in self.remote.sftp.listdir(self.dir):
                self.remote.sftp.remove(posixpath.join(self.dir, name))
            self.remote.sftp.rmdir(self.dir)
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(Exception):
                self.remote.sftp.rmdir(guard)

    def beat(self, force: bool = False) -> None:
        """Refresh the heartbeat (at most every HEARTBEAT_S) on a channel of its own, so it is safe
        in the middle of a pipelined SFTP upload."""
        now = time.monotonic()
        if not force and now - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = now

        def refresh() -> None:
            if self._beat_sftp is None:
                self._beat_sftp = self.remote.client.open_sftp()
            self._beat_sftp.utime(self.owner, None)

        # On a link gone silent the utime on the open channel waited for its answer for good, inside
        # the upload loop; the watchdog closes the connection instead, and the upload then fails as
        # a lost link.
        with contextlib.suppress(Exception):
            self.remote.guarded(refresh, max(self.remote.target.connect_timeout, BEAT_TIMEOUT_S))

    def beating(self, argv: list[str]) -> list[str]:
        """argv wrapped so the device refreshes the heartbeat while it runs (pip on a slow board)."""
        script = 'while sleep 20; do touch "$0"; done & hb=$!; "$@"; rc=$?; kill $hb; exit $rc'
        return ["sh", "-c", script, self.owner, *argv]

    def release_cmd(self) -> str:
        """Shell command removing the lock if (and only if) it is still ours."""
        q = shlex.quote
        return f"grep -qsF {q(self.token)} {q(self.owner)} && rm -rf {q(self.dir)}"

    def forget(self) -> None:
        with _HELD_GUARD:
            _HELD.discard(self.token)


def _owner(text: str | None) -> dict | None:
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _who(holder: dict | None) -> str:
    if not holder:
        return "an unknown flash (no owner recorded)"
    return (f"{holder.get('user', '?')}@{holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"(started {holder.get('started', '?')})")
