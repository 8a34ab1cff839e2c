"""Remote access to a board over SSH: where it is (SshTarget), an authenticated connection with
strict host-key checks (connect), and one session for files and quoted commands (Remote).

Used by the SSH runner (profile), flash and fleets. Host keys are checked against known_hosts;
unknown hosts are refused unless the caller trusts them (which records the key), changed keys are
always refused. paramiko is imported lazily so `edgeq --help` stays instant.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import posixpath
import re
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .errors import DeviceError, EdgeqError
from .interrupts import pending

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach a device. Passwords are deliberately not supported: key or agent."""

    host: str
    user: str | None = None
    port: int = 22
    identity: str | None = None  # private key file; None = ssh-agent and ~/.ssh/id_* keys
    known_hosts: str | None = None  # None = ~/.ssh/known_hosts
    trust_new_host: bool = False
    connect_timeout: float = 10.0
    run_timeout: float = 600.0

    @property
    def label(self) -> str:
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{who}{host}" + (f":{self.port}" if self.port != 22 else "")

    def known_hosts_path(self) -> Path:
        return Path(os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts"))


_TARGET_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d+))?$")


def parse_target(spec: str, **options) -> SshTarget:
    """Parse "user@host[:port]" (IPv6 as "[::1]:2222"); other SshTarget fields come as keywords."""
    m = _TARGET_RE.match(spec.strip())
    if not m:
        raise EdgeqError(f"cannot parse host {spec!r}; use user@host or user@host:port")
    port = int(m["port"]) if m["port"] else options.pop("port", 22)
    if not 0 < port < 65536:
        raise EdgeqError(f"port {port} in {spec!r} is out of range; use 1-65535")
    return SshTarget(host=m["v6"] or m["host"], user=m["user"] or options.pop("user", None),
                     port=port, **options)


def fingerprint(key) -> str:
    """OpenSSH-style SHA256 fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_key_name(target: SshTarget) -> str:
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


_SILENT = logging.NullHandler()  # added once: addHandler skips a handler already there


def connect(target: SshTarget):
    """An authenticated paramiko SSHClient, or a DeviceError saying what to fix."""
    import paramiko

    # paramiko's transport thread logs a dropped handshake ("Error reading SSH protocol banner") with
    # its traceback; with no handler configured Python prints it above edgeq's own one-line error.
    logging.getLogger("paramiko").addHandler(_SILENT)

    kh_path = target.known_hosts_path()
    client = paramiko.SSHClient()
    if kh_path.exists():
        try:
            client.load_host_keys(str(kh_path))
        except (OSError, paramiko.SSHException) as e:
            raise EdgeqError(f"cannot read known_hosts {kh_path}: {e}; fix or remove that file") from None

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            fp = fingerprint(key)
            if not target.trust_new_host:
                raise DeviceError(
                    f"unknown host key for {hostname} ({key.get_name()} {fp}); check it on the device "
                    f"(ssh-keygen -lf /etc/ssh/ssh_host_{key.get_name().split('-')[-1]}_key.pub) "
                    f"and rerun with --trust-new-host to record it in {kh_path}")
            _append_known_host(kh_path, hostname, key)
            client.get_host_keys().add(hostname, key.get_name(), key)

    client.set_missing_host_key_policy(Policy())
    try:
        client.connect(
            target.host, port=target.port, username=target.user,
            key_filename=os.path.expanduser(target.identity) if target.identity else None,
            allow_agent=target.identity is None, look_for_keys=target.identity is None,
            timeout=target.connect_timeout, banner_timeout=target.connect_timeout,
            auth_timeout=target.connect_timeout, channel_timeout=target.connect_timeout)
    except paramiko.BadHostKeyException as e:
        client.close()
        raise DeviceError(
            f"HOST KEY CHANGED for {_host_key_name(target)}: known_hosts has {fingerprint(e.expected_key)}, "
            f"the host sent {fingerprint(e.key)}; this may be an attack. If the device was reinstalled, "
            f"remove the old key with: ssh-keygen -R '{_host_key_name(target)}' -f {kh_path}") from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise DeviceError(f"the key {target.identity} is passphrase-protected; load it into "
                          f"ssh-agent (ssh-add) and omit --identity") from None
    except paramiko.AuthenticationException:
        client.close()
        raise DeviceError(
            f"key authentication to {target.label} failed; pass --identity KEY for a key listed in the "
            f"device's ~/.ssh/authorized_keys (ssh-copy-id), or add it to ssh-agent") from None
    except FileNotFoundError as e:
        client.close()
        raise EdgeqError(f"identity file not found: {e.filename}; pass an existing key to --identity") from None
    except DeviceError:
        client.close()
        raise
    except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
        client.close()
        raise DeviceError(f"cannot connect to {target.label}: {e or type(e).__name__}; check the device is "
                          f"on, reachable, and runs sshd on port {target.port} (--connect-timeout "
                          f"{target.connect_timeout:g}s)") from None
    return client


def _append_known_host(path: Path, hostname: str, key) -> None:
    """Record a trusted key the way ssh does (one line appended; the rest of the file untouched)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as f:
        f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class Remote:
    """One SSH connection: SFTP for files (no shell involved) and exec for quoted commands."""

    def __init__(self, target: SshTarget):
        self.target = target
        self.client = connect(target)
        try:
            self.sftp = self.client.open_sftp()
            # a stalled (not dropped) link must not hang a transfer forever
            self.sftp.get_channel().settimeout(max(target.connect_timeout, 60.0))
            self.home = self.sftp.normalize(".")
        except BaseException:  # no SFTP (or a Ctrl-C): the connection and its thread must not outlive this
            self.client.close()
            raise

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection must never mask the real error
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def cleanup(self, cmd: str, timeout: float = 60.0) -> None:
        """Run a cleanup command, never raising: over this connection or, when it is dead or
        broken (a dropped link), over a new one. Called while a Ctrl-C (or SIGTERM, interrupts.py)
        unwinds the stack, it uses a new connection only: an interrupt inside paramiko's send path
        can leave the old one's send lock held (Transport._send_user_message acquires it outside its
        try), after which any message sent on it waits forever; and one inside a half-sent packet
        garbles the stream, so the server waits for the rest of that packet."""
        def fresh() -> None:
            with Remote(replace(self.target, connect_timeout=min(self.target.connect_timeout, 10.0))) as again:
                again.run(cmd, timeout)

        def here() -> None:
            self.guarded(lambda: self.run(cmd, timeout), timeout + self.target.connect_timeout)

        # (pending: also an interrupt that something turned into its own error on the way up)
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt) or pending()
        for attempt in ((fresh,) if interrupted else (here, fresh)):
            try:
                attempt()
                return
            except Exception:  # noqa: BLE001 - cleanup must never replace the original error
                continue

    def guarded(self, fn: Callable[[], object], seconds: float):
        """fn() with a watchdog that closes this connection after `seconds`. On a link gone silent
        with the socket's send buffer full, paramiko's write loop retries forever (it ends only when
        the transport closes), so any message sent then (an SFTP close, a channel open) hangs."""
        watchdog = threading.Timer(seconds, self.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            return fn()
        finally:
            watchdog.cancel()

    def upload(self, local, rpath: str, beat: Callable[[], object] = lambda: None) -> None:
        """sftp.put with pipelined writes, except that a failure closes the SFTP channel (on a link
        gone silent, the whole connection after 10 s: guarded) and an interruption the connection,
        instead of waiting (60 s, or forever: cleanup says why) for the answer to a close the server
        can no longer parse. `beat` is called between chunks. The size check catches writes the
        server refused (a full disk)."""
        size = os.stat(local).st_size
        beat()
        try:
            with open(local, "rb") as src:
                f = self.sftp.open(rpath, "wb")
                f.set_pipelined(True)
                while chunk := src.read(32768):
                    f.write(chunk)
                    beat()
                f.close()
        except KeyboardInterrupt:  # nothing more goes over this connection
            self.close()
            raise
        except BaseException:
            try:  # the caller goes on with exec channels only (cleanup, df)
                self.guarded(self.sftp.close, 10)
            except Exception:  # noqa: BLE001 - the upload's own error is the one to report
                pass
            raise
        got = self.sftp.stat(rpath).st_size
        if got != size:
            raise OSError(f"the board stored {got} of {size} bytes")

    def path(self, rel: str) -> str:
        return posixpath.join(self.home, rel)

    def makedirs(self, path: str) -> None:
        parts, cur = path.strip("/").split("/"), ""
        for part in parts:
            cur += "/" + part
            try:
                self.sftp.stat(cur)
            except FileNotFoundError:
                try:
                    self.sftp.mkdir(cur, mode=0o700)
                except OSError:
                    self.sftp.stat(cur)  # made meanwhile by a concurrent run: fine; else re-raise

    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except (FileNotFoundError, OSError):
            return False

    def read_text(self, path: str) -> str | None:
        try:
            with self.sftp.open(path, "r") as f:
                return f.read().decode(errors="replace").strip()
        except (OSError, UnicodeError):
            return None

    def run(self, argv_or_cmd, timeout: float, on_stderr: Progress | None = None) -> tuple[int, str, str]:
        """Run a command (argv list is shlex-joined); return (exit code, stdout, stderr).

        Raises DeviceError on timeout or when the connection drops (exit status never arrives).
        """
        cmd = argv_or_cmd if isinstance(argv_or_cmd, str) else shlex.join(argv_or_cmd)
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise DeviceError(f"the connection to {self.target.label} was lost; check the device and rerun")
        chan = transport.open_session(timeout=self.target.connect_timeout)
        chan.settimeout(0.2)
        chan.exec_command(cmd)
        out, err, err_line = [], [], b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                got = False
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                    got = True
                while chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    err.append(data)
                    got = True
                    err_line += data
                    *lines, err_line = err_line.split(b"\n")
                    for line in lines:
                        if on_stderr and line.strip():
                            on_stderr(line.decode(errors="replace").rstrip())
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not transport.is_active() or (chan.closed and not chan.exit_status_ready()):
                    raise DeviceError(f"the connection to {self.target.label} was lost during the run; "
                                      f"check the device (power, network, sshd) and rerun")
                if time.monotonic() > deadline:
                    raise DeviceError(f"the command on {self.target.label} did not finish within "
                                      f"{timeout:g}s; raise --timeout or lower --runs")
                if not got:
                    chan.status_event.wait(0.05)
            code = chan.recv_exit_status()
        except KeyboardInterrupt:  # no channel close on this connection (cleanup says why): drop it
            self.close()
            raise
        except BaseException:
            chan.close()
            raise
        chan.close()
        if code == -1:  # paramiko's "no exit status": the session ended without one
            raise DeviceError(f"the connection to {self.target.label} was lost during the run; rerun")
        return code, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
