"""A stand-in Android phone for tests: the device side of the ADB protocol over TCP.

No phone can exist on the CI machines, so this stands in for `adbd` on a phone at the protocol
boundary. The REAL `adb` client and server (Debian's `adb` package) talk to it after
`adb connect 127.0.0.1:PORT`. It implements what edgeq's runner uses:

* transport: CNXN handshake (banner with ro.product.* properties and features=shell_v2), or an
  AUTH exchange that is never accepted (the "unauthorized" phone); OPEN/OKAY/WRTE/CLSE streams
  with one outstanding WRTE per stream, as the protocol requires;
* `shell,v2,...:` (stdout/stderr/exit-code packets) and the plain `shell:`/`exec:` services: the
  command runs with /bin/sh -c inside a sandbox directory, with /data/local/tmp and /sdcard
  rewritten to directories under it, and a PATH whose `getprop`, `pm` and `am` are stand-ins
  (canned properties; a package database that is one marker file; `am start` of android_demo
  writes the app's result JSON, standing in for the app);
* the sync service: STAT, LIST, SEND/DATA/DONE, RECV, QUIT (v1 only: the banner advertises no
  stat_v2/sendrecv_v2, so the client never uses the v2 forms).

Protocol reference: AOSP adb protocol.txt, SYNC.TXT, SERVICES.TXT.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

A_SYNC, A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (
    0x434E5953, 0x4E584E43, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257, 0x48545541)
A_VERSION = 0x01000001  # >= this version, the data checksum may be skipped
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
DATA = Path(__file__).parent / "data"


def _packet(cmd, arg0, arg1, data=b""):
    # data_check is the byte sum in adb (not a CRC); hosts skip it for A_VERSION >= 0x01000001.
    return struct.pack("<6I", cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF) + data


class _Stream:
    """One adb stream (a service) on the device side: blocking read, flow-controlled write."""

    def __init__(self, conn, local_id, remote_id):
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        self.acked = threading.Event()

    def feed(self, data):
        with self.cond:
            self.buf += data
            self.cond.notify_all()

    def peer_closed(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.acked.set()

    def read_exact(self, n):
        with self.cond:
            while len(self.buf) < n and not self.closed:
                self.cond.wait(1.0)
            if len(self.buf) < n:
                raise EOFError
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out

    def write(self, data):
        for i in range(0, len(data), self.conn.max_payload):
            if self.closed:
                raise EOFError
            self.acked.clear()
            self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i:i + self.conn.max_payload])
            if not self.acked.wait(30):  # the host must OKAY each WRTE before the next one
                raise TimeoutError("host did not acknowledge WRTE")

    def close(self):
        if not self.closed:
            self.closed = True
            self.conn.send(A_CLSE, self.local_id, self.remote_id)


class _Connection:
    def __init__(self, device, sock):
        self.device, self.sock = device, sock
        self.lock = threading.Lock()
        self.streams = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD

    def send(self, cmd, arg0, arg1, data=b""):
        with self.lock:
            self.sock.sendall(_packet(cmd, arg0, arg1, data))

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def recv_packet(self):
        cmd, arg0, arg1, length, _crc, magic = struct.unpack("<6I", self.recv_exact(24))
        if magic != cmd ^ 0xFFFFFFFF:
            raise EOFError("bad magic")
        return cmd, arg0, arg1, self.recv_exact(length) if length else b""

    def run(self):
        try:
            self._loop()
        except (EOFError, OSError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.peer_closed()
            try:
                self.sock.close()
            except OSError:
                pass

    def _loop(self):
        while True:
            cmd, arg0, arg1, data = self.recv_packet()
            if cmd == A_CNXN:
                self.max_payload = min(MAX_PAYLOAD, arg1 or MAX_PAYLOAD)
                if self.device.authorized:
                    self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, self.device.banner())
                else:  # ask for a signature we will never accept: the phone shows a prompt nobody taps
                    self.send(A_AUTH, 1, 0, os.urandom(20))
            elif cmd == A_AUTH:
                if arg0 == 2:  # SIGNATURE: reject by asking again; after RSAPUBLICKEY (3) stay silent
                    self.send(A_AUTH, 1, 0, os.urandom(20))
            elif cmd == A_OPEN and self.device.authorized:
                local_id = self.next_id
                self.next_id += 1
                service = data.rstrip(b"\0").decode()
                handler = self.device.service_handler(service)
                if handler is None:
                    self.send(A_CLSE, 0, arg0)
                    continue
                stream = _Stream(self, local_id, arg0)
                self.streams[local_id] = stream
                self.send(A_OKAY, local_id, arg0)
                threading.Thread(target=self._serve, args=(handler, stream, service), daemon=True).start()
            elif cmd == A_WRTE:
                stream = self.streams.get(arg1)
                if stream is not None:
                    stream.feed(data)
                    self.send(A_OKAY, arg1, arg0)
            elif cmd == A_OKAY:
                stream = self.streams.get(arg1)
                if stream is not None:
                    stream.acked.set()
            elif cmd == A_CLSE:
                stream = self.streams.pop(arg1, None)
                if stream is not None:
                    stream.peer_closed()

    def _serve(self, handler, stream, service):
        try:
            handler(stream)
        except (EOFError, TimeoutError, OSError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass
            self.streams.pop(stream.local_id, None)
            self.device.log.append(service)


class StandInPhone:
    """A TCP server that behaves like one phone's adbd. `root` is the sandbox directory.

    authorized=False makes it answer CNXN with AUTH and never accept (adb shows "unauthorized").
    `props` are what `getprop` and the CNXN banner report.
    """

    def __init__(self, root, *, authorized=True, props=None):
        self.root = Path(root)
        self.authorized = authorized
        self.props = {"ro.product.name": "edgeq_standin", "ro.product.model": "EdgeqStandIn",
                      "ro.product.device": "standin", "ro.product.manufacturer": "edgeq",
                      "ro.product.cpu.abi": "arm64-v8a", "ro.build.version.sdk": "34",
                      "ro.build.version.release": "14"}
        self.props.update(props or {})
        self.log = []  # services opened, in order (for tests)
        for d in ("data/local/tmp", "sdcard", "system/bin", "data/system"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._install_tools()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.serial = "127.0.0.1:%d" % self.port
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    # -- transport ---------------------------------------------------------------------------
    def banner(self):
        keys = ("ro.product.name", "ro.product.model", "ro.product.device")
        props = "".join("%s=%s;" % (k, self.props[k]) for k in keys)
        return ("device::%sfeatures=shell_v2,fixed_push_mkdir" % props).encode()

    def _accept(self):
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            conn = _Connection(self, sock)
            self.conns.append(conn)
            threading.Thread(target=conn.run, daemon=True).start()

    def close(self):
        self.server.close()
        for c in self.conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
                c.sock.close()
            except OSError:
                pass

    # -- paths -------------------------------------------------------------------------------
    def host_path(self, device_path):
        """Where a device path lives in the sandbox."""
        return self.root / device_path.lstrip("/")

    def map_command(self, cmd):
        for prefix in ("/data/local/tmp", "/sdcard", "/storage/emulated/0"):
            target = str(self.host_path("/sdcard" if prefix == "/storage/emulated/0" else prefix))
            cmd = cmd.replace(prefix, target)
        return cmd

    # -- services ----------------------------------------------------------------------------
    def service_handler(self, service):
        if service.startswith("shell,v2") or service.startswith("shell,"):
            cmd = service.split(":", 1)[1]
            return lambda s: self._shell(s, cmd, v2="v2" in service.split(":", 1)[0].split(","))
        if service.startswith(("shell:", "exec:")):
            return lambda s: self._shell(s, service.split(":", 1)[1], v2=False)
        if service == "sync:":
            return self._sync
        return None

    def _env(self):
        env = {"PATH": "%s:/usr/bin:/bin" % self.host_path("/system/bin"), "HOME": str(self.root),
               "EDGEQ_STANDIN_ROOT": str(self.root), "EDGEQ_STANDIN_PROPS": json.dumps(self.props),
               "EDGEQ_STANDIN_SAMPLES": str(DATA / "benchmark_model_samples.txt"),
               "EDGEQ_STANDIN_APP_RESULT": str(DATA / "android_demo_result.json"),
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C"}
        return env

    def _shell(self, stream, cmd, v2):
        proc = subprocess.run(["/bin/sh", "-c", self.map_command(cmd)], cwd=self.root, env=self._env(),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        if v2:
            def pkt(kind, data):
                return struct.pack("<BI", kind, len(data)) + data
            if proc.stdout:
                stream.write(pkt(1, proc.stdout))
            if proc.stderr:
                stream.write(pkt(2, proc.stderr))
            stream.write(pkt(3, bytes([proc.returncode & 0xFF])))
        else:
            stream.write(proc.stdout + proc.stderr)

    def _sync(self, stream):
        def reply(id_, payload=b""):
            stream.write(id_ + struct.pack("<I", len(payload)) + payload)

        while True:
            id_, length = struct.unpack("<4sI", stream.read_exact(8))
            if id_ == b"QUIT":
                return
            arg = stream.read_exact(length).decode() if id_ in (b"STAT", b"LIST", b"SEND", b"RECV") else ""
            if id_ == b"STAT":
                try:
                    st = os.lstat(self.host_path(arg))
                    stream.write(b"STAT" + struct.pack("<3I", st.st_mode, st.st_size & 0xFFFFFFFF,
                                                       int(st.st_mtime)))
                except OSError:
                    stream.write(b"STAT" + struct.pack("<3I", 0, 0, 0))
            elif id_ == b"LIST":
                d = self.host_path(arg)
                for name in (sorted(os.listdir(d)) if d.is_dir() else []):
                    st = os.lstat(d / name)
                    stream.write(b"DENT" + struct.pack("<4I", st.st_mode, st.st_size & 0xFFFFFFFF,
                                                       int(st.st_mtime), len(name)) + name.encode())
                stream.write(b"DONE" + struct.pack("<4I", 0, 0, 0, 0))
            elif id_ == b"SEND":
                path, _, mode = arg.rpartition(",")
                data = bytearray()
                while True:
                    cid, clen = struct.unpack("<4sI", stream.read_exact(8))
                    if cid == b"DATA":
                        data += stream.read_exact(clen)
                    elif cid == b"DONE":
                        break
                    else:
                        return reply(b"FAIL", b"unexpected %r in SEND" % cid)
                target = self.host_path(path)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".adbtmp")
                    tmp.write_bytes(bytes(data))
                    os.chmod(tmp, int(mode) & 0o777)
                    os.replace(tmp, target)
                except OSError as e:
                    reply(b"FAIL", ("couldn't create file: %s" % e.strerror).encode())
                    continue
                stream.write(b"OKAY" + struct.pack("<I", 0))
            elif id_ == b"RECV":
                try:
                    data = self.host_path(arg).read_bytes()
                except OSError as e:
                    reply(b"FAIL", (e.strerror or "error").encode())
                    continue
                for i in range(0, len(data), SYNC_DATA_MAX):
                    reply(b"DATA", data[i:i + SYNC_DATA_MAX])
                stream.write(b"DONE" + struct.pack("<I", 0))
            else:
                return reply(b"FAIL", b"unknown sync command")

    # -- tools on the stand-in's PATH ----------------------------------------------------------
    def _install_tools(self):
        bin_dir = self.host_path("/system/bin")
        tools = {"getprop": _GETPROP, "pm": _PM, "am": _AM}
        for name, body in tools.items():
            p = bin_dir / name
            p.write_text("#!%s\n%s" % (sys.executable, body))
            p.chmod(0o755)


# Stand-in for Android's `getprop [KEY]`: canned properties.
_GETPROP = r'''
import json, os, sys
props = json.loads(os.environ["EDGEQ_STANDIN_PROPS"])
if len(sys.argv) > 1:
    print(props.get(sys.argv[1], ""))
else:
    for k, v in sorted(props.items()):
        print("[%s]: [%s]" % (k, v))
'''

# Stand-in for `pm path PKG` / `pm install [-r] [-t] FILE`: the package database is a marker file
# holding the installed APK's bytes; only zip files (APKs are zips) install.
_PM = r'''
import os, sys
root = os.environ["EDGEQ_STANDIN_ROOT"]
db = os.path.join(root, "data", "system")
args = sys.argv[1:]
if args[:1] == ["path"]:
    if os.path.exists(os.path.join(db, args[1] + ".apk")):
        print("package:/data/app/%s-1/base.apk" % args[1]); sys.exit(0)
    sys.exit(1)
if args[:1] == ["install"]:
    apk = [a for a in args[1:] if not a.startswith("-")][0]
    data = open(apk, "rb").read()
    if not data.startswith(b"PK\x03\x04"):
        print("Failure [INSTALL_PARSE_FAILED_NOT_APK: Failed to parse %s]" % apk); sys.exit(1)
    with open(os.path.join(db, "com.edgeq.demo.apk"), "wb") as f:
        f.write(data)
    print("Success"); sys.exit(0)
print("Error: unknown pm command %s" % args, file=sys.stderr); sys.exit(1)
'''

# Stand-in for `am start -W -S -n com.edgeq.demo/.MainActivity --es model P --es delegate D
# --ei threads N --ei warmup W --ei runs R --ei seed S --es out NAME`, i.e. for the android_demo app
# itself: it records the extras (am.args in the sandbox root) and writes tests/data/android_demo_result.json
# (the shared example) with the extras filled in, to the app's external files dir, as the app does.
# It also reports delegate_coverage as the app must (runners.adb.APP_COVERAGE_FIELDS): all nodes for
# gpu/nnapi unless a `standin_app_coverage` file in /data/local/tmp/edgeq/bin holds the JSON to
# report instead ("null": an app build that reports none).
_AM = r'''
import hashlib, json, os, sys
root = os.environ["EDGEQ_STANDIN_ROOT"]
args = sys.argv[1:]
if args[:1] != ["start"]:
    print("Error: unknown am command", file=sys.stderr); sys.exit(1)
comp = args[args.index("-n") + 1]
if not os.path.exists(os.path.join(root, "data", "system", comp.split("/")[0] + ".apk")):
    print("Error: Activity class {%s} does not exist." % comp); sys.exit(1)
extras, i = {}, 0
while i < len(args):
    if args[i] in ("--es", "--ei"):
        extras[args[i + 1]] = int(args[i + 2]) if args[i] == "--ei" else args[i + 2]
        i += 3
    else:
        i += 1
print("Starting: Intent { cmp=%s (has extras) }" % comp)
with open(os.path.join(root, "am.args"), "a") as f:
    f.write(json.dumps(extras) + "\n")
result = json.load(open(os.environ.get("EDGEQ_STANDIN_APP_RESULT", "")))
model = open(extras["model"], "rb").read()
result.update(model=os.path.basename(extras["model"]), model_sha256=hashlib.sha256(model).hexdigest(),
              model_bytes=len(model), delegate=extras["delegate"], threads=extras["threads"])
result["warmup"]["count"] = extras["warmup"]
cov_file = os.path.join(root, "data", "local", "tmp", "edgeq", "bin", "standin_app_coverage")
if os.path.exists(cov_file):
    cov = json.load(open(cov_file))
elif extras["delegate"] in ("gpu", "nnapi"):
    cov = {"delegate": extras["delegate"], "execution": "complete", "delegated": 31, "total": 31}
else:
    cov = None
if cov is not None:
    result["delegate_coverage"] = cov
out_dir = os.path.join(root, "sdcard", "Android", "data", "com.edgeq.demo", "files")
os.makedirs(out_dir, exist_ok=True)
tmp = os.path.join(out_dir, extras["out"] + ".tmp")
with open(tmp, "w") as f:
    json.dump(result, f)
os.replace(tmp, os.path.join(out_dir, extras["out"]))
print("Status: ok")
'''


# Stand-in for TFLite's benchmark_model binary for arm64-v8a, pushed by the runner like the real
# one. It records the flags it got, checks --graph exists, and prints a REAL sample output from
# tests/data/benchmark_model_samples.txt: Source 4 (NNAPI, 31/31 nodes delegated) for
# --use_nnapi=true, Source 2 (CPU run with percentiles) otherwise. A `standin_mode` file next to
# it switches to: "crash" (part of the log, then abort -> exit 134), "low-coverage" (Source 4
# with its Replacing line changed to 12 of 31 nodes, plus Source 5's real op-profiling table when
# --enable_op_profiling=true), "not-executed" (Source 8, NNAPI running no node, followed by the
# statistics lines of Source 7: same issue, same user and phone), "partial" (Source 7 as is:
# "w/ 44 delegate kernels", no Replacing line) or "gpu-complete" (Source 9: GPU completely
# executed, no Replacing line).
FAKE_BENCHMARK_MODEL = r'''
import os, re, sys
here = os.path.dirname(os.path.abspath(__file__))
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
with open(os.path.join(os.environ["EDGEQ_STANDIN_ROOT"], "benchmark_model.args"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
text = open(os.environ["EDGEQ_STANDIN_SAMPLES"]).read()
parts = re.split(r"^## (Source \d+):.*$", text, flags=re.M)
src = {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}
if not os.path.exists(flags.get("graph", "")):
    print("ERROR: Could not open '%s'." % flags.get("graph"), file=sys.stderr)
    print("ERROR: Benchmarking failed.", file=sys.stderr); sys.exit(1)
mode_file = os.path.join(here, "standin_mode")
mode = open(mode_file).read().strip() if os.path.exists(mode_file) else "ok"
out = src["Source 4"] if flags.get("use_nnapi") == "true" else src["Source 2"]
if mode == "crash":
    sys.stderr.write("".join(src["Source 4"].splitlines(True)[:12])); sys.stderr.flush()
    os.abort()
if mode == "not-executed":
    out = src["Source 8"] + "\n" + src["Source 7"].split("\n", 2)[2]
if mode == "partial":
    out = src["Source 7"]
if mode == "gpu-complete":
    out = src["Source 9"]
if mode == "low-coverage":
    out = src["Source 4"].replace("Replacing 31 out of 31", "Replacing 12 out of 31").replace(
        "yielding 1 partitions", "yielding 3 partitions")
    if flags.get("enable_op_profiling") == "true":
        out += src["Source 5"]
sys.stderr.write(out)
'''


def install_fake_benchmark_model(path):
    """Write the stand-in benchmark_model (an executable script) to `path` on the host."""
    path = Path(path)
    path.write_text("#!%s\n%s" % (sys.executable, FAKE_BENCHMARK_MODEL))
    path.chmod(0o755)
    return path


class AdbServer:
    """A real adb server on its own port (ANDROID_ADB_SERVER_PORT), killed at close()."""

    def __init__(self, adb="adb"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.adb = adb
        self.env = dict(os.environ, ANDROID_ADB_SERVER_PORT=str(self.port))
        self.run("start-server")

    def run(self, *args, timeout=30):
        return subprocess.run([self.adb, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def connect(self, phone, state="device", timeout=15):
        """`adb connect` to a stand-in and wait until the server lists it in `state`."""
        out = self.run("connect", phone.serial)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.run("devices").stdout.splitlines()
            if "%s\t%s" % (phone.serial, state) in lines:
                return out
            time.sleep(0.1)
        raise AssertionError("stand-in %s never became %r: %s / %s" % (
            phone.serial, state, out.stdout + out.stderr, self.run("devices").stdout))

    def disconnect(self, phone):
        self.run("disconnect", phone.serial)

    def close(self):
        self.run("kill-server")
